#!/usr/bin/env bash
# Run ON the GPU machine in one call, from the repository root, carrying .device (see prepare.sh):
#   run(command="bash benchmarks/device/run.sh", carry=[".device"], timeout_s=450)
# Dry run here, on the CPU, small: DEVICE=cpu OUT=/tmp/kit bash benchmarks/device/run.sh
# Everything it measures goes to $OUT (default ./device-out); copy it to benchmarks/results/<gpu>/.
# At most 8 files come back from the machine, so this writes 8: env.txt, whole-case.log, whole-case/whole_case.{json,md},
# host-cpu.log, host-cpu/host_cpu.json, pytest-cuda.txt, bench-report.md. Each step writes as it goes and has a
# timeout, and the four steps share END seconds (default 430, under the call's 450), so a step cut short still leaves
# what it did. A second call on the still-warm machine can redo a part: STEPS="whole bench" END=240 (steps: whole,
# host, pytest, bench; the ones left out get no time; host reads the case whole builds).
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
DEVICE=${DEVICE:-cuda}
END=${END:-430}
HOST_S=45    # host_cpu.py
PYTEST_S=100 # the CUDA tests (their fixture trains a small model on the CPU first)
BENCH_S=70   # flare-bench, small: the TF32 peak, NVML per batch, the fresh process beside a bare start-up
STEPS=" ${STEPS:-whole host pytest bench} "
for s in $STEPS; do
    case $s in whole|host|pytest|bench) ;; *) echo "STEPS: unknown step '$s' (whole, host, pytest, bench; spaces between)"; exit 1;; esac
done
step() { [[ "$STEPS" == *" $1 "* ]]; }
step host || HOST_S=0; step pytest || PYTEST_S=0; step bench || BENCH_S=0
mkdir -p "$OUT"
ENV_TXT="$OUT/env.txt"
: > "$ENV_TXT"
SITE=$(mktemp -d)
install() {  # a --target install of wheels is an unpacking: do that where pip is missing or fails
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$@" >> "$ENV_TXT" 2>&1 \
        || { echo "pip failed: unzipped $*" >> "$ENV_TXT"; for w in "$@"; do python3 -m zipfile -e "$w" "$SITE"; done; }
}
if python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    install $(ls .device/wheels/*.whl | grep -v rapidgzip)
    # rapidgzip on its own: a machine whose glibc refuses its wheel still runs everything else.
    install .device/wheels/rapidgzip*.whl
else  # the wheels are cp312: elsewhere (a dry run) they would shadow the packages installed there
    echo "not Python 3.12: the carried wheels are not installed; the installed packages are used" >> "$ENV_TXT"
fi
export PYTHONPATH="$SITE:$PWD"
{
    nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv
    python3 -c "import sys, torch, numpy; print(sys.version, torch.__version__, torch.version.cuda, numpy.__version__)"
    python3 -c "import rapidgzip; print('rapidgzip', rapidgzip.__version__)"
} >> "$ENV_TXT" 2>&1
FIRST_RC=0
failed() { if [ "$1" -ne 0 ] && [ "$FIRST_RC" -eq 0 ]; then FIRST_RC=$1; fi; }
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
if [ ! -e ../shared/data/flare21-sample/TrainingImg/train_000_0000.nii.gz ]; then
    echo "WARNING: no real CT sample at ../shared/data/flare21-sample: its CUDA tests will skip" | tee -a "$ENV_TXT"
fi
# 1. The whole case (issue 10): stages, start-up timeline, fresh processes with NVML, every opt-in path, folders.
#    It gets what the later steps leave; its --budget stops starting runs early enough to end within its timeout.
WORK=${WORK:-/tmp/flareseg-device-work}  # the CT and label maps stay on the machine (a second call's host step
mkdir -p "$WORK"                         # reads them); only the reports come back
WC_S=$(( END - SECONDS - HOST_S - PYTEST_S - BENCH_S - 10 ))
SIZE=(); [ "$DEVICE" = cpu ] && SIZE=(--slices 6 --size 64 --width 4 --cases 2)
if step whole && [ "$WC_S" -ge 60 ]; then
    timeout -k 5 "$WC_S" python3 benchmarks/device/whole_case.py --out "$OUT/whole-case" --work "$WORK" \
        --device "$DEVICE" --budget $(( WC_S - 25 )) "${SIZE[@]}" > "$OUT/whole-case.log" 2>&1
    RC=$?; failed "$RC"; echo "whole_case.py: rc $RC, ${SECONDS} s into the run"; tail -25 "$OUT/whole-case.log"
elif step whole; then
    echo "whole_case.py: not run, ${WC_S} s left for it (END=$END)"
fi
# 2. The host CPU on the same case: post-processing whole/streaming, histogram, inflate (ISA-L, rapidgzip by cores).
HOST_S=$(( HOST_S < END - SECONDS - 5 ? HOST_S : END - SECONDS - 5 ))
if step host && [ "$HOST_S" -ge 10 ]; then
    timeout -k 5 "$HOST_S" python3 benchmarks/device/host_cpu.py --work "$WORK" --out "$OUT/host-cpu" \
        > "$OUT/host-cpu.log" 2>&1
    RC=$?; failed "$RC"; echo "host_cpu.py: rc $RC, ${SECONDS} s into the run"; tail -30 "$OUT/host-cpu.log"
fi
# 3. The CUDA tests of the inferer, the memory planner, the runtime and the bench (they skip on CPU-only machines).
PYTEST_S=$(( PYTEST_S < END - SECONDS - 5 ? PYTEST_S : END - SECONDS - 5 ))
if step pytest && [ "$PYTEST_S" -ge 10 ]; then
    # SIGINT at the limit, not SIGTERM: pytest then still prints its failures and summary (a SIGTERM left dots).
    # Deselected: the two tests of a machine without a GPU, which skip on every GPU and would hide a real skip.
    timeout -s INT -k 10 "$PYTEST_S" python3 -m pytest -q -p no:cacheprovider -rfEs tests/runtime/test_inferer.py \
        tests/runtime/test_memory.py tests/runtime/test_runtime.py \
        tests/bench/test_bench.py::test_cuda_fp32_peak_uses_the_convolutions_math \
        tests/bench/test_bench.py::test_nvml_sampler_sees_an_allocation_above_idle \
        -k "(cuda or gpu or nvml) and not without_one" > "$OUT/pytest-cuda.txt" 2>&1
    RC=$?; failed "$RC"; echo "pytest: rc $RC, ${SECONDS} s into the run"; tail -8 "$OUT/pytest-cuda.txt"
    grep -q "^SKIPPED" "$OUT/pytest-cuda.txt" && echo "WARNING: some CUDA tests skipped (see pytest-cuda.txt)"
fi
# 4. flare-bench, small, in what is left: its CUDA figures (TF32 peak, NVML per batch and volume, the fresh process
#    beside a bare start-up) have not run on a GPU since they changed. Only its report.md comes back.
BENCH=(--width 64 --size 512 --batch 1,8 --slices 16 --repeats 5 --warmup 2)
[ "$DEVICE" = cpu ] && BENCH=(--width 4 --size 64 --batch 1,2 --slices 4 --repeats 2 --warmup 1)
BACKENDS=torch-cuda-fp32,torch-cuda-fp16; [ "$DEVICE" = cpu ] && BACKENDS=torch-cpu-fp32
LEFT=$(( END - SECONDS - 5 ))
if step bench && [ "$LEFT" -ge 20 ]; then
    # Not -q: each figure is logged as it is measured, so a run cut short (whose folder is removed) keeps them.
    timeout -k 5 "$LEFT" python3 -m flareseg.bench.cli -o "$WORK/bench" --backends "$BACKENDS" "${BENCH[@]}" \
        > /dev/null 2> "$WORK/bench.log"  # stdout: the report again
    RC=$?; failed "$RC"
    { cat "$WORK/bench/report.md" 2>/dev/null || echo "no report (rc $RC)"; echo; echo "log:"; tail -40 "$WORK/bench.log"; } \
        > "$OUT/bench-report.md"
    echo "flare-bench: rc $RC, ${SECONDS} s into the run"
elif step bench; then
    echo "flare-bench: not run, ${LEFT} s left for it (END=$END)"
fi
# A report rewrite cut short by a timeout leaves its temporary file: it would be a ninth file to bring back.
find "$OUT" -name '.*.part*' -delete
find "$OUT" -type f | sort
# The call's status: the first step that failed (each step's own rc is in the lines above), else 0.
exit "$FIRST_RC"
