#!/usr/bin/env bash
# Run ON the GPU machine in one call, from the repository root, carrying .device (see prepare.sh):
#   run(command="bash benchmarks/device/run.sh", carry=[".device"], timeout_s=450)
# Dry run here, on the CPU, small: DEVICE=cpu OUT=/tmp/kit bash benchmarks/device/run.sh
# Everything it measures goes to $OUT (default ./device-out); copy it to benchmarks/results/<gpu>/.
# At most 8 files come back from the machine, so this writes 7: env.txt, whole-case.log, whole-case/whole_case.{json,md},
# host-cpu.log, host-cpu/host_cpu.json, pytest-cuda.txt. Each step writes as it goes and has a timeout, and the three
# steps share END seconds (default 430, under the call's 450), so a step cut short still leaves what it did.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
DEVICE=${DEVICE:-cuda}
END=${END:-430}
HOST_S=50    # host_cpu.py
PYTEST_S=90  # the CUDA tests (their fixture trains a small model on the CPU first)
mkdir -p "$OUT"
ENV_TXT="$OUT/env.txt"
: > "$ENV_TXT"
SITE=$(mktemp -d)
install() {  # a --target install of wheels is an unpacking: do that where pip is missing or fails
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$@" >> "$ENV_TXT" 2>&1 \
        || { echo "pip failed: unzipped $*" >> "$ENV_TXT"; for w in "$@"; do python3 -m zipfile -e "$w" "$SITE"; done; }
}
install $(ls .device/wheels/*.whl | grep -v rapidgzip)
# rapidgzip on its own: a machine whose glibc refuses its wheel still runs everything else.
install .device/wheels/rapidgzip*.whl
export PYTHONPATH="$SITE:$PWD"
{
    nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv
    python3 -c "import sys, torch, numpy; print(sys.version, torch.__version__, torch.version.cuda, numpy.__version__)"
    python3 -c "import rapidgzip; print('rapidgzip', rapidgzip.__version__)"
} >> "$ENV_TXT" 2>&1
# What the runs need, said at once rather than as a failure minutes in; without it nothing else is worth running.
PREFLIGHT="import scipy, packaging, nibabel, cc3d, isal, tqdm, pytest, torch, flareseg.runtime.cli"
if [ "$DEVICE" = cuda ]; then
    PREFLIGHT="$PREFLIGHT, pynvml; assert torch.cuda.is_available(), 'torch sees no GPU'; pynvml.nvmlInit()"
fi
if ! python3 -c "$PREFLIGHT; print('preflight ok')" >> "$ENV_TXT" 2>&1; then
    echo "PREFLIGHT FAILED"; tail -5 "$ENV_TXT"; exit 1
fi
# The tests look for the real CT in ../shared/data, which does not travel: point it at the carried copy.
if [ ! -e ../shared/data ] && [ -d .device/data ]; then mkdir -p ../shared && ln -s "$PWD/.device/data" ../shared/data; fi
# 1. The whole case (issue 10): stages, start-up timeline, fresh processes with NVML, every opt-in path, folders.
#    It gets what the later steps leave; its --budget stops starting runs early enough to end within its timeout.
WORK=$(mktemp -d)  # the CT and label maps stay on the machine; only the reports come back
WC_S=$(( END - SECONDS - HOST_S - PYTEST_S - 10 ))
SIZE=(); [ "$DEVICE" = cpu ] && SIZE=(--slices 6 --size 64 --width 4 --cases 2)
timeout -k 5 "$WC_S" python3 benchmarks/device/whole_case.py --out "$OUT/whole-case" --work "$WORK" \
    --device "$DEVICE" --budget $(( WC_S - 25 )) "${SIZE[@]}" > "$OUT/whole-case.log" 2>&1
echo "whole_case.py: rc $?, ${SECONDS} s into the run"; tail -25 "$OUT/whole-case.log"
# 2. The host CPU on the same case: post-processing whole/streaming, histogram, inflate (ISA-L, rapidgzip by cores).
timeout -k 5 "$HOST_S" python3 benchmarks/device/host_cpu.py --work "$WORK" --out "$OUT/host-cpu" \
    > "$OUT/host-cpu.log" 2>&1
echo "host_cpu.py: rc $?, ${SECONDS} s into the run"; tail -30 "$OUT/host-cpu.log"
# 3. The CUDA tests of the inferer, the memory planner and the runtime (they skip on CPU-only machines).
timeout -k 5 "$PYTEST_S" python3 -m pytest -q -p no:cacheprovider -rs tests/test_inferer.py tests/test_memory.py \
    tests/test_runtime.py -k "cuda or gpu or nvml" > "$OUT/pytest-cuda.txt" 2>&1
echo "pytest: rc $?, ${SECONDS} s into the run"; tail -8 "$OUT/pytest-cuda.txt"
find "$OUT" -type f | sort
