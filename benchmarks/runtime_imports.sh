#!/usr/bin/env bash
# Import time of flare-infer's PyTorch path (runtime, its runners and pipeline), this tree against another
# revision, alternating run by run:  bash benchmarks/runtime_imports.sh BASE_REV [ROUNDS]
# Both trees are imported with the site's packages but without the editable install's finder (python -S),
# from a neutral folder, so each run imports the tree it names.
set -euo pipefail
BASE=${1:?a base revision}; ROUNDS=${2:-7}
HERE=$(cd "$(dirname "$0")/.." && pwd)
OLD=$(mktemp -d)/tree
git -C "$HERE" worktree add -q --detach "$OLD" "$BASE"
trap 'git -C "$HERE" worktree remove --force "$OLD"' EXIT
SITE=$(python -c "import site; print(site.getsitepackages()[0])")
CODE="import sys; from flareseg.runtime import TorchRunner, segment_file; import flareseg.runtime.cli, flareseg.runtime.pipeline
assert sys.modules['flareseg'].__file__.startswith(sys.argv[1]), sys.modules['flareseg'].__file__
print('onnx imported' if 'onnx' in sys.modules else 'no onnx', end=' ')"
cd /tmp
for _ in $(seq "$ROUNDS"); do
    for tree in "$OLD" "$HERE"; do
        start=$(date +%s.%N)
        PYTHONPATH="$tree:$SITE" python -S -c "$CODE" "$tree"
        echo "$([ "$tree" = "$OLD" ] && echo base || echo this) $(echo "$(date +%s.%N) - $start" | bc)"
    done
done
