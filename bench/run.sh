#!/usr/bin/env bash
# Runs the training-step benchmark through our trainer (CUDA graph, then eager) and through
# diffusers (eager, cached+fused, CUDA graph) on the same machine and prints one table.
# Arguments go to both, e.g.
#   bench/run.sh --arch sd15 --resolution 512 --batch 1 --steps 50
#   bench/run.sh --phase text-encoder --batch 1
#   bench/run.sh --tiny --resolution 64 --steps 3     # CPU smoke test
# OURS / MODES choose the rows: OURS="graph eager" MODES=eager,fused,graph by default; an
# OURS entry may add `+unpacked` (fp32 UNet weights cast by autocast every step instead of
# packed ones), e.g. OURS="graph graph+unpacked".
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TRAINER="${TRAINER:-target/release/dreambooth-trainer}"
PYTHON="${PYTHON:-python3}"
results="$(mktemp)"
for ours in ${OURS:-graph eager}; do
  flags=""
  for part in ${ours//+/ }; do
    case "$part" in
      eager) flags="$flags --eager" ;;
      unpacked) flags="$flags --unpacked" ;;
    esac
  done
  "$TRAINER" bench $flags "$@" >>"$results" || echo "{\"impl\": \"dreambooth-$ours\", \"error\": \"exit $?\"}" >>"$results"
done
if [ -n "${MODES-eager,fused,graph}" ]; then
  "$PYTHON" bench/diffusers_ref.py --modes "${MODES-eager,fused,graph}" "$@" >>"$results"
fi
"$PYTHON" bench/table.py "$results"
