#!/usr/bin/env bash
# One short device run: lowMemory against default peak memory, then the whole session.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TORCH_LIB="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
T=bench/bin/dreambooth-trainer
python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$T.xz" "$T" && chmod +x "$T"
for memory in low default; do
  echo "== bench --memory $memory"
  timeout 60 "$T" bench --arch sd15 --resolution 512 --batch 1 --steps 15 --warmup 5 --memory "$memory" 2>&1 | grep -v autocast | tail -4
done
echo "== whole session"
timeout 200 bench/whole-session.sh
