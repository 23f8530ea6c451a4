"""A CT read in a thread while the main thread imports torch: how the read's step size matters.

Each read step gives the GIL back (ISA-L inflates without it) and must take it again,
which can cost up to the interpreter's switch interval while another thread runs Python,
as an import does. Fresh child processes, alternating round by round:

- ``after import``: import torch and the pipeline, then read (what flare-infer did before
  it read ahead);
- ``beside import, N MiB``: start the read in a thread with N MiB read steps, import
  meanwhile, wait for the read.

    python benchmarks/read_beside_import.py lps300_0000.nii.gz --rounds 4

(``host_stages.py`` writes that 512 x 512 x 300 phantom into its work folder.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, threading, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import flareseg.volume as volume
chunk = {chunk}
if chunk:
    volume._READ_CHUNK = chunk << 20
t1 = time.perf_counter()
read = {{}}

def work():
    a = time.perf_counter()
    volume.read_ct({ct!r})
    read["s"] = time.perf_counter() - a

if chunk:
    thread = threading.Thread(target=work)
    thread.start()
import torch
import flareseg.runtime.pipeline
t2 = time.perf_counter()
if chunk:
    thread.join()
else:
    work()
print(json.dumps({{"import_s": t2 - t1, "read_s": read["s"], "total_s": time.perf_counter() - t0}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ct", type=Path, help="a .nii.gz CT volume")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--chunks", default="1,4", help="read step sizes to try, in MiB (default 1,4)")
    args = ap.parse_args()
    settings = {"after import": 0, **{f"beside import, {c} MiB": int(c) for c in args.chunks.split(",")}}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, chunk in settings.items():
            code = CHILD.format(root=str(ROOT), chunk=chunk, ct=str(args.ct.resolve()))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out))
    print(f"{args.ct.name}, {args.rounds} rounds alternating; medians (all rounds), seconds")
    for name, rows in results.items():
        cells = []
        for key in ("import_s", "read_s", "total_s"):
            values = [r[key] for r in rows]
            cells.append(f"{key[:-2]} {statistics.median(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})")
        print(f"{name:22s} " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
