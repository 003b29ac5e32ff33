"""Every command README.md shows runs as written, so the README cannot rot (issue 15, part 6).

The commands are read from README.md when the tests are collected: each line of its ```bash blocks,
and each inline `vllm-gptq ...` or `benchmarks/...py ...` in its prose. How each one runs here:

- the ```bash blocks' `vllm-gptq` commands run for real, in order, in a scratch folder (`out/` is
  relative) whose `.venv` is this checkout's. The tiny llama stands in for SmolLM2 (it is put in
  `out/smollm2` first, so `fetch-model` finds it and every later step takes seconds, not minutes),
  and QUICK_FLAGS are appended (argparse: the last value of a flag wins);
- a benchmark, and an inline `vllm-gptq` command with arguments (often placeholders like DIR...),
  runs in check mode: `--dry-run` where the script has one (it plans the whole run, checks each step's
  command line, runs nothing), else the script's own argparse parser reads the README's arguments and
  the process exits there. A full run is a benchmark (minutes to an hour) or a timing run on a
  shared machine;
- a bare mention (`vllm-gptq inspect`, `benchmarks/eval_table.py`) must answer `--help`.

NOT_RUN lists, with the reason, the few commands that cannot run in a test; every other command
without a rule fails, so a new kind of command in README needs a decision here.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PYTHON = Path(sys.executable)
CACHE = Path(os.environ.get("VLLM_GPTQ_CACHE", ROOT / ".cache"))

NOT_RUN = {  # command prefix -> why it is not run here
    "make demo": "set-up, then a 32 x 512 GPTQ run of the real SmolLM2 and vLLM generation (minutes); "
                 "its steps are the Quantize block's commands, which run here",
    "make test": "the whole test suite, this file included",
    "vllm serve": "a server that runs until stopped: tests/test_vllm_serve.py starts `vllm serve "
                  "--quantization gptq-plugin` on loopback and checks its answers",
    "curl": "needs the server above: tests/test_vllm_serve.py sends this request (test_plain_http_completion)",
}
QUICK_FLAGS = {  # vllm-gptq subcommand -> appended in the ```bash blocks (smaller calibration and text)
    "quantize": ["--nsamples", "8", "--seqlen", "128"],
    "ppl": ["--max-tokens", "1024"],
}
WRAPPERS = ("/usr/bin/time", "-v", "python", "python3", ".venv/bin/python")  # stripped before the command

# Runs a script or module up to its argparse parse and no further: argparse's own checks (unknown
# flags, types, choices) on exactly the README's arguments.
PARSE_ONLY = """
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_then_exit(self, *args, **kwargs):
    print("parsed:", vars(parse(self, *args, **kwargs)))
    sys.exit(0)
argparse.ArgumentParser.parse_args = parse_then_exit
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


# --- reading README ------------------------------------------------------------------------------

def bash_blocks(text: str) -> list[list[str]]:
    """The command lines of each ```bash block (continuations joined, comments dropped)."""
    blocks = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        lines = [shlex.join(shlex.split(line, comments=True)) for line in block.replace("\\\n", " ").splitlines()]
        blocks.append([line for line in lines if line])
    return blocks


def inline_commands(text: str) -> list[str]:
    """`...` spans of the prose (outside code blocks) that run vllm-gptq or a benchmark script."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M).replace("\n", " ")
    spans = re.findall(r"`([^`]+)`", prose)
    return list(dict.fromkeys(s.strip() for s in spans if command_of(shlex.split(s))[0] is not None))


def command_of(argv: list[str]) -> tuple[str | None, list[str], dict[str, str]]:
    """(what it runs: 'vllm-gptq' or a benchmarks/*.py path or None, its arguments, env assignments)."""
    env = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
        key, _, value = argv[0].partition("=")
        env[key], argv = value, argv[1:]
    while argv and argv[0] in WRAPPERS:
        argv = argv[1:]
    if argv and Path(argv[0]).name == "vllm-gptq":
        return "vllm-gptq", argv[1:], env
    if argv and re.fullmatch(r"benchmarks/\w+\.py", argv[0]):
        return argv[0], argv[1:], env
    return None, argv, env


def not_run_reason(line: str) -> str | None:
    argv = shlex.split(line)
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
        argv = argv[1:]
    words = " ".join([Path(argv[0]).name] + argv[1:]) if argv else ""
    return next((why for prefix, why in NOT_RUN.items() if words.startswith(prefix)), None)


TEXT = README.read_text()
BLOCKS = bash_blocks(TEXT)
RUNNABLE = [b for b in BLOCKS if any(not not_run_reason(line) for line in b)]  # the rest: NOT_RUN only
# README's tables point to benchmarks/QUALITY.md for the commands that made them: those are checked too.
INLINE = inline_commands(TEXT) + inline_commands((ROOT / "benchmarks" / "QUALITY.md").read_text())


# --- running -------------------------------------------------------------------------------------

def run(argv: list[str], cwd: Path, env: dict[str, str], what: str, timeout: float = 600) -> str:
    proc = subprocess.run(argv, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"README command failed (exit {proc.returncode}): {what}\nran: {shlex.join(argv)}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc.stdout


def check_mode(target: str, args: list[str]) -> list[str]:
    """The argv that checks a benchmark or an inline vllm-gptq command without running it."""
    if target == "vllm-gptq":
        if len(args) == 1:  # a bare mention of a subcommand
            return [str(PYTHON.with_name("vllm-gptq")), args[0], "--help"]
        return [str(PYTHON), "-c", PARSE_ONLY, "vllm_gptq_plugin.cli", *args]
    if not args:
        return [str(PYTHON), target, "--help"]
    if '"--dry-run"' in (ROOT / target).read_text():  # before any --extra REMAINDER in the README's args
        return [str(PYTHON), target, "--dry-run", *args]
    return [str(PYTHON), "-c", PARSE_ONLY, target, *args]


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b[0][:40])
def test_bash_block_runs(block, tmp_path, tiny_llama):
    sandbox = tmp_path / "sandbox"
    (sandbox / "out").mkdir(parents=True)
    (sandbox / ".venv").symlink_to(ROOT / ".venv")
    shutil.copytree(tiny_llama, sandbox / "out" / "smollm2")  # the stand-in for SmolLM2 (see the docstring)
    for line in block:
        if not_run_reason(line):
            continue
        target, args, env = command_of(shlex.split(line))
        if target is None:
            pytest.fail(f"README shows `{line}` and this test has no rule for it: run it here or add it "
                        "to NOT_RUN with the reason")
        if target == "vllm-gptq":
            argv = [str(sandbox / ".venv" / "bin" / "vllm-gptq"), *args, *QUICK_FLAGS.get(args[0], [])]
        else:
            argv = check_mode(target, args)
        run(argv, cwd=sandbox if target == "vllm-gptq" else ROOT, env={**env, "VLLM_GPTQ_CACHE": str(CACHE)},
            what=line)


@pytest.mark.parametrize("line", INLINE, ids=[line[:60] for line in INLINE])
def test_inline_command_is_accepted(line):
    target, args, env = command_of(shlex.split(line))
    run(check_mode(target, args), cwd=ROOT, env=env, what=line, timeout=300)


def test_readme_has_the_commands_this_file_expects():
    """Guards the extraction and the allow-list: they must still match what README says."""
    lines = [line for block in BLOCKS for line in block]
    assert any(line.startswith(".venv/bin/vllm-gptq quantize") for line in lines), lines
    assert any(line.startswith("benchmarks/quality.py --configs") for line in INLINE), INLINE  # QUALITY.md
    for prefix in NOT_RUN:  # a stale entry would silently allow a command that no longer exists
        assert any(not_run_reason(line) == NOT_RUN[prefix] for line in lines), f"NOT_RUN[{prefix!r}] matches nothing"
