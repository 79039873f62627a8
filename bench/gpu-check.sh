#!/usr/bin/env bash
# The GPU check run on a lent machine (PyTorch installed, no Rust): the trainer binary and
# the test binaries built elsewhere are carried in bench/bin, diffusers' and transformers'
# wheels in bench/wheels. Prints CUDA facts, runs the CUDA smoke tests and the
# graph-vs-eager equivalence test, then the side-by-side benchmark tables.
#   bench/gpu-check.sh            # the full run
#   STEPS=3 bench/gpu-check.sh    # fewer timed steps
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. bench/lib-path.sh
export TRAINER=bench/bin/dreambooth-trainer
# The binaries travel xz-compressed (the carried files have a size limit).
for xz in bench/bin/*.xz; do
  [ -x "${xz%.xz}" ] && continue
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$xz" "${xz%.xz}"
  chmod +x "${xz%.xz}"
done
STEPS="${STEPS:-30}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
echo "== installing diffusers and transformers from carried wheels"
python3 -m pip install -q --no-index --find-links bench/wheels diffusers==0.42.1 2>&1 | tail -3
python3 -m pip install -q --no-index --no-deps --find-links bench/wheels transformers tokenizers 2>&1 | tail -3
"$TRAINER" info
echo "== CUDA graph vs eager, 20 steps each"
timeout 100 bench/bin/cuda_graph_equivalence --ignored --test-threads 1 --nocapture 2>&1 | grep -vE "^\s*$" | tail -12
run() { echo "== $*"; timeout "${RUN_TIMEOUT:-150}" bench/run.sh --arch sd15 --resolution 512 --steps "$STEPS" --warmup 5 "$@"; }
run --batch 1
OURS=graph MODES=graph run --batch 4
OURS=graph MODES=fused run --phase text-encoder --batch 1
OURS="graph eager" MODES="" run --batch 1 --memory low
