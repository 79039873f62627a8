#!/usr/bin/env bash
# The trainer's cluster behaviour on a CUDA machine (PyTorch installed, no Rust needed): a
# tiny session on the GPU with --listen, /metrics scraped while it trains (the GPU memory
# gauges must be there and non-zero), then SIGTERM mid-run (exit 76, a saved state) and a
# rerun that resumes and succeeds. The CPU tests (trainer/tests/cli_train_cluster.rs)
# cover the rest; this is what only a GPU can show.
#   TRAINER=target/release/dreambooth-trainer scripts/gpu-telemetry-check.sh
#   DEVICE=cpu UNET_STEPS=12 SIGNAL_AT=4 scripts/gpu-telemetry-check.sh   # the script itself, on a CPU
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TORCH_LIB="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
WORK="$(mktemp -d)"
TRAINER="${TRAINER:-bench/bin/dreambooth-trainer}"
# A binary carried to a lent machine travels xz-compressed.
if [ ! -x "$TRAINER" ] && [ -f "$TRAINER.xz" ]; then
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$TRAINER.xz" "$WORK/trainer"
  chmod +x "$WORK/trainer"
  TRAINER="$WORK/trainer"
fi
"$TRAINER" tiny-model --out "$WORK/model" --seed 1 >/dev/null
"$TRAINER" demo-photos --out "$WORK/photos" --count 6 --size 64 >/dev/null
cat >"$WORK/session.json" <<EOF
{"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothSession", "metadata": {"name": "gpu"},
 "spec": {"baseModel": {"uri": "file://$WORK/model"},
          "dataset": {"uri": "file://$WORK/photos", "token": "zwxtoy", "resolution": 64},
          "output": {"uri": "file://$WORK/out"},
          "training": {"unet": {"steps": ${UNET_STEPS:-1500}}, "textEncoder": {"steps": 20}, "seed": 1},
          "checkpoints": {"precision": "fp32"}, "samples": {"steps": 2}}}
EOF
PORT=19390
DEVICE="${DEVICE:-cuda}"
start() {
  "$TRAINER" train - --device "$DEVICE" --listen "127.0.0.1:$PORT" \
    --termination-log "$WORK/termination.json" <"$WORK/session.json" 2>>"$WORK/log" &
  PID=$!
}
start
# Scrapes while the UNet phase runs, then sends SIGTERM; prints what it saw.
python3 - "$PORT" "$PID" "${SIGNAL_AT:-200}" <<'EOF'
import json, os, signal, sys, time, urllib.request
port, pid, signal_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
get = lambda path: urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read().decode()
deadline = time.time() + 180
progress = {}
while time.time() < deadline:
    try:
        progress = json.loads(get("/progress"))
        if progress["stage"] == "unet" and progress["step"] >= signal_at:
            break
    except Exception:
        pass
    time.sleep(0.2)
print("progress:", json.dumps(progress))
metrics = [l for l in get("/metrics").splitlines() if not l.startswith("#")]
for line in metrics:
    if any(k in line for k in ("gpu_memory", "_step{", "total_steps", "steps_per_second", 'phase="unet"', "data_preparation")):
        print(" ", line)
gpu = {l.split("{")[0]: float(l.rsplit(" ", 1)[1]) for l in metrics if "gpu_memory" in l}
ok = len(gpu) == 2 and all(v > 0 for v in gpu.values())
print("GPU gauges present and non-zero:", ok)
print("healthz:", get("/healthz").strip())
os.kill(pid, signal.SIGTERM)
EOF
wait "$PID"; echo "after SIGTERM: exit $? termination $(cat "$WORK/termination.json")"
ls "$WORK/out/state"
start
wait "$PID"; echo "rerun: exit $? termination $(cat "$WORK/termination.json")"
grep -E "resuming from|error" "$WORK/log" | tail -5
