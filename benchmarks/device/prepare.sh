#!/usr/bin/env bash
# Run HERE (not on the GPU machine): fills the ignored folder .device/ that the GPU run carries:
# Python 3.12 wheels the GPU machine lacks, and the real CT sample (../shared does not travel).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .device/wheels .device/data
# One version of each: two of the same package stop the whole install there. Pinned to what the kit was run with.
rm -f .device/wheels/*.whl
cp ../shared/tools/device/wheels-py312/*.whl .device/wheels/
python -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps \
    -d .device/wheels isal==1.9.1 tqdm==4.70.1 pydicom==3.0.2 highdicom==0.28.2 pylibjpeg==2.1.0 \
    pylibjpeg-openjpeg==2.6.0
# rapidgzip 0.16 ships manylinux_2_28 wheels only; torch 2.11 needs glibc 2.28 anyway.
python -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --no-deps \
    -d .device/wheels rapidgzip==0.16.2
ls .device/wheels | sed 's/-.*//' | sort | uniq -d | grep . && { echo "two versions of one package in .device/wheels"; exit 1; }
if [ -d ../shared/data/flare21-sample ]; then cp -r ../shared/data/flare21-sample .device/data/; fi
du -sh .device
