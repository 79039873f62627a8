#!/usr/bin/env bash
# Creates the project-local Python venv that provides libtorch (from the PyTorch wheel),
# the CUDA headers for the C++ shim, and the S3 test server. Idempotent: a second run with
# everything in place only checks the versions.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DREAMBOOTH_VENV:-$ROOT/.venv}"
TORCH_VERSION="2.11.0"
CUDA_TOOLKIT="cuda-toolkit[nvcc]==13.0.2"
# nvcc's front end (cicc, from nvidia-nvvm) and its crt headers must match its ptxas;
# left unpinned, pip takes the newest, whose PTX the 13.0 ptxas cannot assemble.
NVCC_PARTS=("nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88")
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "bootstrap: creating venv at $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

have() { "$VENV/bin/python" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }

if [[ "$(have torch)" != "$TORCH_VERSION" ]]; then
  echo "bootstrap: installing torch==$TORCH_VERSION"
  "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
fi
# torch already pulls cuda-toolkit in, but without the nvcc extra that brings the
# headers the shim compiles against, so look for a file of the extra itself.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [[ ! -e "$SITE/nvidia/cu13/bin/nvcc" ]]; then
  echo "bootstrap: installing $CUDA_TOOLKIT (headers for the C++ shim)"
  "$VENV/bin/python" -m pip install --quiet "$CUDA_TOOLKIT"
fi
if [[ "$(have nvidia-nvvm)" != "13.0.88" || "$(have nvidia-cuda-crt)" != "13.0.88" ]]; then
  echo "bootstrap: pinning ${NVCC_PARTS[*]} (nvcc compiles the optimizer kernel)"
  "$VENV/bin/python" -m pip install --quiet "${NVCC_PARTS[@]}"
fi
if [[ -z "$(have numpy)" ]]; then
  # torch warns on every start without it.
  "$VENV/bin/python" -m pip install --quiet numpy
fi
# The reference side of the tests that check a real client reads our files.
if [[ "$(have diffusers)" != "0.42.1" || "$(have transformers)" != "5.24.0" ]]; then
  echo "bootstrap: installing diffusers and transformers (reference client for tests)"
  "$VENV/bin/python" -m pip install --quiet "diffusers==0.42.1" "transformers==5.24.0"
fi
if [[ -z "$(have moto)" ]]; then
  echo "bootstrap: installing moto[server] (the S3 server used by the end-to-end tests)"
  "$VENV/bin/python" -m pip install --quiet "moto[server]"
fi

TORCH_DIR="$("$VENV/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
# The relative path .cargo/config.toml points LIBTORCH at; a stable link survives
# a different Python minor version inside the venv.
ln -sfn "$TORCH_DIR" "$ROOT/.venv-torch"
echo "bootstrap: libtorch $TORCH_VERSION at $TORCH_DIR"
