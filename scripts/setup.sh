#!/usr/bin/env bash
# Creates .venv (or $TOKENFLOW_VENV) and installs the project with its dev tools.
# Where no GPU is present, the CPU build of torch is installed first so the project's
# `torch>=2.3` range is already satisfied and pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TOKENFLOW_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# Some machines list local package folders that may not exist; pip warns about each one. Keep logs readable.
quiet_pip() { "${PIP[@]}" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing the default (CUDA) torch build" >&2
    quiet_pip "torch>=2.3"
  else
    echo "setup: no GPU, installing the CPU build torch==${TOKENFLOW_TORCH_VERSION:-2.13.0}" >&2
    quiet_pip "torch==${TOKENFLOW_TORCH_VERSION:-2.13.0}"
  fi
fi
if ! "$VENV/bin/python" -c "import tokenflow, services, clients, diffusers, grpc_tools" >/dev/null 2>&1 \
   || [ pyproject.toml -nt "$VENV/.tokenflow-installed" ]; then
  quiet_pip -e ".[dev]"
  touch "$VENV/.tokenflow-installed"
fi
echo "$VENV"
