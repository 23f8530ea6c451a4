#!/usr/bin/env bash
# Run ON the GPU machine in one call, from the repository root, carrying .device (see prepare.sh):
#   run(command="bash benchmarks/device/run.sh", carry=[".device"], timeout_s=540)
# Everything it measures goes to $OUT (default ./device-out); copy it to benchmarks/results/<gpu>/.
set -uo pipefail
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .device/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH="$SITE:$PWD"
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
python3 -c "import torch, sys; print(sys.version, torch.__version__, torch.version.cuda)" > "$OUT/versions.txt" 2>&1
# 1. The whole case: stages in-process, fresh processes with NVML, folder throughput (issue 10 targets).
timeout 300 python3 benchmarks/device/whole_case.py --out "$OUT/whole-case" 2>&1 | tail -40
# 2. Device pre-processing and the memory-budget batch, against the default CUDA path (issue 10 items 1, 6).
timeout 150 python3 benchmarks/device/preprocess_check.py "$OUT/preprocess_check.json" 2>&1 | tail -20
# 3. Every backend against PyTorch fp32 on this GPU (issue 11).
timeout 120 python3 -m flareseg.bench.cli --check --slices 16 -o "$OUT/check" 2>&1 | tail -30
# 4. The CUDA test paths (they skip on CPU-only machines).
timeout 90 python3 -m pytest -q -x tests/test_runtime.py tests/test_inferer.py tests/test_memory.py -k 'cuda or gpu' -p no:cacheprovider 2>&1 | tail -5
ls -R "$OUT" | head -40
