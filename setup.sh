#!/usr/bin/env bash
# Creates .venv (if missing) and installs fedsim with its test tools.
# The CPU build of PyTorch goes in first, so no CUDA build is pulled on CPU machines.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.2" --index-url https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install -q -e ".[test]"
