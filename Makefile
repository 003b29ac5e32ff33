# The two commands of the README. Both run scripts/setup.sh first (idempotent, quick when done).
.PHONY: setup demo test
PY := .venv/bin/python

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	bash scripts/test.sh
