#!/usr/bin/env bash
# Runs the training-step benchmark through our trainer and through diffusers on the same
# machine and prints both as one table. Arguments go to both, e.g.
#   bench/run.sh --arch sd15 --resolution 512 --batch 1 --steps 50
#   bench/run.sh --tiny --resolution 64 --steps 3     # CPU smoke test
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TRAINER="${TRAINER:-target/release/dreambooth-trainer}"
PYTHON="${PYTHON:-python3}"
results="$(mktemp)"
"$TRAINER" bench --eager "$@" | sed 's/^{/{"impl": "dreambooth-eager", /' >>"$results"
"$PYTHON" bench/diffusers_ref.py "$@" >>"$results"
"$PYTHON" - "$results" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
print(f"{'implementation':<20} {'arch':<5} {'res':>5} {'batch':>5} {'steps/s':>8} {'images/s':>9} {'ms/step':>8} {'peak GiB':>9}")
for r in rows:
    peak = "-" if r.get("peakGib") is None else f"{r['peakGib']:.2f}"
    print(f"{r['impl']:<20} {r['arch']:<5} {r['resolution']:>5} {r['batch']:>5} {r['stepsPerSecond']:>8.2f} "
          f"{r['imagesPerSecond']:>9.2f} {r['msPerStep']:>8.1f} {peak:>9}")
PY
