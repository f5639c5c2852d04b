#!/usr/bin/env bash
# Every GPU number of the README's Performance and Results tables, on one CUDA GPU (not run yet: no GPU was lent to
# this build; at EPOCHS=5 an estimated 25 minutes on an H100, so lower EPOCHS to fit a shorter lease).
# Run from the repository root after the install; FER2013 is sharded from ../shared/data/fer2013/ (or --source)
# into shards/fer2013 by the first recipe run, and ../shared/models/vit-mae-base is used when it holds the weights.
#   bash cluster/gpu-benchmarks.sh [results folder, default jobs/benchmark-results] ; EPOCHS=5 by default
set -euo pipefail
out=${1:-jobs/benchmark-results}
epochs=${EPOCHS:-5}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python jobs/benchmark.py train --gpu --json "$out/train-gpu.json"          # step img/s and MFU, frozen and not
python jobs/benchmark.py infer --gpu --json "$out/infer-gpu.json"          # bf16 inference, batched and single
python jobs/benchmark.py recipe --gpu --epochs "$epochs" --json "$out/recipe-gpu-224.json"
python jobs/benchmark.py recipe --gpu --epochs "$epochs" --image-size 112 --json "$out/recipe-gpu-112.json"
