#!/usr/bin/env bash
# The GPU check run on a lent machine (PyTorch installed, no Rust): the trainer binary
# and test binaries built elsewhere are carried in bench/bin, diffusers' wheels in
# bench/wheels. Prints CUDA facts, runs the CUDA smoke tests, then the benchmark table.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TORCH_LIB="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TRAINER=bench/bin/dreambooth-trainer
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
echo "== trainer info"; "$TRAINER" info
echo "== libtorch smoke tests on the GPU"; bench/bin/libtorch_smoke --test-threads 1 2>&1 | tail -6
echo "== installing diffusers from carried wheels"
python3 -m pip install -q --no-index --find-links bench/wheels diffusers==0.42.1 2>&1 | tail -3
for args in "--batch 1" "--batch 4"; do
  echo "== SD1.5 512 $args"
  timeout 200 bench/run.sh --arch sd15 --resolution 512 --steps 30 --warmup 5 $args
done
