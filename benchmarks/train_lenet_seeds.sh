#!/usr/bin/env bash
# Issue item 1: train the FSSD-recipe LeNet on FashionMNIST for each seed (default 1 2 3).
# Usage: nice -n 19 bash benchmarks/train_lenet_seeds.sh [EPOCHS] [SEEDS...]
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-14}; shift || true
SEEDS=${*:-1 2 3}
for s in $SEEDS; do
  start=$(date +%s)
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/lightning-ood fit \
    --config benchmarks/configs/lenet_fashionmnist_train.yaml \
    --seed_everything "$s" --trainer.max_epochs "$EPOCHS" \
    --experiment "lenet_fmnist_e${EPOCHS}_seed${s}"
  echo "seed $s: ${EPOCHS} epochs in $(( $(date +%s) - start )) s"
done
