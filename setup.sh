#!/usr/bin/env bash
# Creates .venv and installs genbench with everything it needs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: this pair installs from the machine's local files; an unpinned torch downloads several GB.
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "genbench installed in $(pwd)/.venv  (run: .venv/bin/genbench --help)"
