"""Prints the JSON lines of `dreambooth-trainer bench` and `diffusers_ref.py` as one table."""

import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
print(f"{'implementation':<24} {'arch':<5} {'phase':<12} {'memory':<8} {'weights':<7} {'res':>4} {'batch':>5} "
      f"{'steps/s':>8} {'images/s':>9} {'ms/step':>8} {'peak GiB':>9} {'reserved':>9} {'floor':>6} {'loss':>8}")
for r in rows:
    name = r["impl"]
    if "error" in r:
        print(f"{name:<24} failed: {r['error']}")
        continue
    def num(key, fmt):
        return "-" if r.get(key) is None else format(r[key], fmt)
    name = r["impl"]
    print(f"{name:<24} {r['arch']:<5} {r.get('phase', 'unet'):<12} {r.get('memory', 'default'):<8} {r.get('weights', '-'):<7} "
          f"{r['resolution']:>4} {r['batch']:>5} {r['stepsPerSecond']:>8.2f} {r['imagesPerSecond']:>9.2f} "
          f"{r['msPerStep']:>8.1f} {num('peakGib', '.2f'):>9} {num('peakReservedGib', '.2f'):>9} "
          f"{num('fractionOfFloor', '.3f'):>6} {num('finalLoss', '.4f'):>8}")
