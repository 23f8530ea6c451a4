#!/usr/bin/env bash
# Run ON the GPU machine in one call, from the repository root, carrying .device (see prepare.sh):
#   run(command="bash benchmarks/device/run.sh", carry=[".device"], timeout_s=420)
# Everything it measures goes to $OUT (default ./device-out); copy it to benchmarks/results/<gpu>/.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
    $(ls .device/wheels/*.whl | grep -v rapidgzip) 2>&1 | tail -2
# rapidgzip on its own: a machine whose glibc refuses its wheel still runs everything else.
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .device/wheels/rapidgzip*.whl 2>&1 | tail -2
export PYTHONPATH="$SITE:$PWD"
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
python3 -c "import sys, torch, numpy; print(sys.version, torch.__version__, torch.version.cuda, numpy.__version__)" \
    > "$OUT/versions.txt" 2>&1
# 1. The whole case (issue 10): stages, start-up timeline, fresh processes with NVML, every opt-in path, folders.
WORK=$(mktemp -d)  # the CT and label maps stay on the machine; only the reports come back
timeout 280 python3 benchmarks/device/whole_case.py --out "$OUT/whole-case" --work "$WORK" 2>&1 | tail -25
# 2. The host CPU on the same case: inflate (ISA-L, rapidgzip by cores), histogram, post-processing whole/streaming.
timeout 60 python3 benchmarks/device/host_cpu.py --work "$WORK" --out "$OUT/host-cpu" 2>&1 | tail -30
# 3. The CUDA-only tests of the inferer, the memory planner and the runtime (they skip on CPU-only machines).
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_inferer.py tests/test_memory.py \
    -k "cuda or gpu or nvml" 2>&1 | tail -6 | tee "$OUT/pytest-cuda.txt"
ls -R "$OUT" | head -30
