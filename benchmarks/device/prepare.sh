#!/usr/bin/env bash
# Run HERE (not on the GPU machine): fills the ignored folder .device/ that the GPU run carries:
# Python 3.12 wheels the GPU machine lacks, and the real CT sample (../shared does not travel).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .device/wheels .device/data
cp ../shared/tools/device/wheels-py312/*.whl .device/wheels/
python -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps \
    -d .device/wheels isal tqdm pydicom highdicom pylibjpeg pylibjpeg-openjpeg
# rapidgzip 0.16 (the version tested) ships manylinux_2_28 wheels only; torch 2.11 needs glibc 2.28 anyway.
python -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --no-deps \
    -d .device/wheels "rapidgzip>=0.16"
if [ -d ../shared/data/flare21-sample ]; then cp -r ../shared/data/flare21-sample .device/data/; fi
du -sh .device
