#!/usr/bin/env bash
# A whole session on the GPU, timed from the command to its manifest (model load, data
# preparation, both phases, checkpoint, samples and export included). The full-size SD 1.5
# folder has random weights, written by the trainer itself (fp16, not timed).
#   bench/whole-session.sh            # on the lent GPU machine, trainer carried in bench/bin
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. bench/lib-path.sh
TRAINER="${TRAINER:-bench/bin/dreambooth-trainer}"
if [ -f "$TRAINER.xz" ] && [ ! -x "$TRAINER" ]; then
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$TRAINER.xz" "$TRAINER"
  chmod +x "$TRAINER"
fi
WORK=/tmp/whole-session
rm -rf "$WORK" && mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$TRAINER" random-model --arch sd15 --out "$WORK/sd15" --seed 0 >/dev/null
"$TRAINER" demo-photos --out "$WORK/photos" --count 10 --size 512 >/dev/null
du -sh "$WORK/sd15"
LOG="${OUT:-$WORK}/whole-session.log"
start=$(date +%s.%N)
"$TRAINER" train "${SESSION:-bench/whole-session.yaml}" --device "${DEVICE:-cuda}" >"$LOG" 2>&1 \
  || { tail -20 "$LOG"; exit 1; }
end=$(date +%s.%N)
grep -vE "autocast" "$LOG" | tail -12
python3 - "$start" "$end" "$WORK/output" <<'PY'
import json, os, sys
start, end, out = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
manifest = json.load(open(os.path.join(out, "manifest.json")))
print(f"whole session wall: {end - start:.1f} s")
for a in manifest.get("artifacts", []):
    print(f"  {a['kind']:12} step {a['step']:5} {a['uri']} {a['bytes']}")
PY
