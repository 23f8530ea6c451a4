#!/usr/bin/env bash
# Run ON the GPU machine in one call, from the repository root, carrying .device (see prepare.sh):
#   run(command="bash benchmarks/device/run.sh", carry=[".device"], timeout_s=450)
# Everything it measures goes to $OUT (default ./device-out); copy it to benchmarks/results/<gpu>/.
# Each step writes its results as it goes, so a step cut short by its timeout still leaves what it did.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
SITE=$(mktemp -d)
install() {  # a --target install of wheels is an unpacking: do that where pip is missing or fails
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$@" > "$OUT/pip.txt" 2>&1 \
        || for w in "$@"; do python3 -m zipfile -e "$w" "$SITE"; done
}
install $(ls .device/wheels/*.whl | grep -v rapidgzip)
# rapidgzip on its own: a machine whose glibc refuses its wheel still runs everything else.
install .device/wheels/rapidgzip*.whl
export PYTHONPATH="$SITE:$PWD"
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
python3 -c "import sys, torch, numpy; print(sys.version, torch.__version__, torch.version.cuda, numpy.__version__)" \
    > "$OUT/versions.txt" 2>&1
# What the runs need, said at once rather than as a failure minutes in.
python3 -c "import scipy, packaging, nibabel, cc3d, isal, tqdm, pynvml, pytest; print('imports ok')" \
    > "$OUT/preflight.txt" 2>&1; cat "$OUT/preflight.txt"
python3 -c "import rapidgzip; print('rapidgzip', rapidgzip.__version__)" >> "$OUT/preflight.txt" 2>&1
# The tests look for the real CT in ../shared/data, which does not travel: point it at the carried copy.
if [ ! -e ../shared/data ] && [ -d .device/data ]; then mkdir -p ../shared && ln -s "$PWD/.device/data" ../shared/data; fi
# 1. The whole case (issue 10): stages, start-up timeline, fresh processes with NVML, every opt-in path, folders.
WORK=$(mktemp -d)  # the CT and label maps stay on the machine; only the reports come back
timeout 270 python3 benchmarks/device/whole_case.py --out "$OUT/whole-case" --work "$WORK" --budget 240 \
    > "$OUT/whole-case.log" 2>&1; tail -25 "$OUT/whole-case.log"
# 2. The host CPU on the same case: inflate (ISA-L, rapidgzip by cores), histogram, post-processing whole/streaming.
timeout 60 python3 benchmarks/device/host_cpu.py --work "$WORK" --out "$OUT/host-cpu" > "$OUT/host-cpu.log" 2>&1
tail -30 "$OUT/host-cpu.log"
# 3. The CUDA tests of the inferer, the memory planner and the runtime (they skip on CPU-only machines).
timeout 80 python3 -m pytest -q -p no:cacheprovider -rs tests/test_inferer.py tests/test_memory.py \
    tests/test_runtime.py -k "cuda or gpu or nvml" > "$OUT/pytest-cuda.txt" 2>&1; tail -8 "$OUT/pytest-cuda.txt"
ls -R "$OUT" | head -30
