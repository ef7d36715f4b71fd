#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and mambapeft installed in editable mode (with test extras).
# Run from the repository root. Pinning torch==2.13.0 here (not in pyproject) keeps pip from pulling a
# multi-GB CUDA build on machines that only need the CPU; users elsewhere get any torch>=2.1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
