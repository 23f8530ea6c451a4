"""Reading an exported model's flareseg metadata in a fresh process: the protobuf wire reader the runners use
against ``import onnx`` + ``onnx.load`` (what they used before), alternately, round by round.

Each round starts two fresh interpreters (torch and numpy imported first in both, as a runner's process has
them) and times only the read, its imports included. Prints the medians and their ratio.

Run: python benchmarks/onnx_metadata.py MODEL.onnx [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

WIRE = """
import time, numpy, torch
from pathlib import Path
t = time.perf_counter()
from flareseg.export.metadata import onnx_metadata_props
props = onnx_metadata_props(Path({path!r}))
print(time.perf_counter() - t, len(props["flareseg"]))
"""
ONNX = """
import time, numpy, torch
t = time.perf_counter()
import onnx
model = onnx.load({path!r}, load_external_data=False)
props = {{p.key: p.value for p in model.metadata_props}}
print(time.perf_counter() - t, len(props["flareseg"]))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"wire reader": [], "onnx.load": []}
    for _ in range(args.rounds):
        for name, code in (("wire reader", WIRE), ("onnx.load", ONNX)):
            out = subprocess.run([sys.executable, "-c", code.format(path=args.model)], capture_output=True, text=True)
            seconds, length = out.stdout.split()
            times[name].append(float(seconds))
    for name, values in times.items():
        print(f"{name}: median {1000 * statistics.median(values):.2f} ms over {len(values)} fresh processes")
    ratio = statistics.median(times["onnx.load"]) / statistics.median(times["wire reader"])
    print(f"onnx.load / wire reader: {ratio:.0f}x (metadata {length} characters)")


if __name__ == "__main__":
    main()
