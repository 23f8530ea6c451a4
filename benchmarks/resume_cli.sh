#!/bin/bash
# A fresh flare-infer over a folder of N done cases (nothing to run), today's code against a baseline commit run
# from a temporary git worktree, alternating round by round; wall seconds of whole processes.
#   N=300 ROUNDS=7 BASE=9071b6d bash benchmarks/resume_cli.sh
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-300}; ROUNDS=${ROUNDS:-7}; BASE=${BASE:-9071b6d}
W=${WORK:-$(mktemp -d)}; mkdir -p $W/in
cd "$ROOT"
python - <<PY
import sys; sys.path.insert(0, "$ROOT/benchmarks")
from pathlib import Path
import startup
ckpt, ct = startup.build_case(Path("$W"))
import shutil
for i in range($N):
    shutil.copy(ct, Path("$W/in") / f"case_{i:04d}_0000.nii.gz")
PY
git worktree add -q --detach $W/base $BASE
flare-infer --model $W/tiny.pt -i $W/in -o $W/out -q --device cpu > /dev/null
for r in $(seq $ROUNDS); do
  for tree in "$ROOT" $W/base; do
    s=$(date +%s.%N); (cd $W && PYTHONPATH=$tree python -m flareseg.runtime.cli --model $W/tiny.pt -i $W/in -o $W/out -q --device cpu > /dev/null); e=$(date +%s.%N)
    echo "$([ "$tree" = "$ROOT" ] && echo today || echo "at $BASE") $(echo "$e - $s" | bc)"
  done
done
git worktree remove --force $W/base
rm -rf "$W"
