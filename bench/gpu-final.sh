#!/usr/bin/env bash
# One device run for a release: correctness first (packed against fp32 weights, graph
# against eager), then speed and memory side by side with diffusers in the same lease,
# then the whole session. The trainer and the equivalence test binary travel
# xz-compressed in bench/bin, diffusers' wheels in bench/wheels.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. bench/lib-path.sh
export TRAINER=bench/bin/dreambooth-trainer
for xz in bench/bin/*.xz; do
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$xz" "${xz%.xz}"
  chmod +x "${xz%.xz}"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
python3 -m pip install -q --no-index --find-links bench/wheels diffusers==0.42.1 2>&1 | tail -2
"$TRAINER" info 2>&1 | tail -3
echo "== packed vs fp32 weights, CUDA graph vs eager (20 steps each)"
timeout 150 bench/bin/cuda_graph_equivalence --ignored --test-threads 1 2>&1 \
  | grep -E "^test |test result|panicked|difference|loss" | tail -16
run() { echo "== $*"; timeout 150 bench/run.sh --arch sd15 --resolution 512 --steps 30 --warmup 5 "$@"; }
OURS="graph graph+unpacked" MODES=graph run --batch 1
OURS="graph" MODES=graph run --batch 4
echo "== whole session"
timeout 200 bench/whole-session.sh
