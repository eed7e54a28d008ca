#!/usr/bin/env bash
# FSSD Table 2 row A, training side: the FSSD LeNet recipe (benchmarks/configs/
# lenet_fashionmnist_train.yaml) for seeds 1-5 (Base/ODIN/Maha/MCD/FSSD use seeds 1-3; the Deep
# Ensemble takes all five as members) and the same recipe with Outlier Exposure (KMNIST test
# split as outliers, lambda 0.5) for seeds 1-3. Two lanes of one thread each (2 cores).
#
# Usage: bash benchmarks/fssd_table2_train.sh [EPOCHS [OE_FINETUNE_EPOCHS]]
#   EPOCHS               plain LeNets' epochs (default 14, the paper's).
#   OE_FINETUNE_EPOCHS   unset: the OE LeNets train from scratch for EPOCHS epochs
#                        (oe_lenet_e{EPOCHS}_seed{s}). Set: each is the plain LeNet of its seed
#                        fine-tuned with OE for that many epochs (Hendrycks et al.'s fine-tuning
#                        variant; the recipe's optimizer restarts at lr 1.0), named
#                        oeft{OE_FINETUNE_EPOCHS}_lenet_e{EPOCHS}_seed{s}. An OE step costs two
#                        plain steps (ID and outlier batches), so from scratch at 14 epochs it
#                        is ~2x a plain LeNet's time; fine-tuning for 2 epochs is ~0.3x.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-14}
FT=${2:-}
LOGS=.cache/bench_logs
fit() {  # epochs, seed, experiment, extra args...
  local e=$1 s=$2 exp=$3; shift 3
  local start; start=$(date +%s)
  rm -f "$LOGS/$exp.done" "$LOGS/$exp.failed"
  if ! OMP_NUM_THREADS=1 .venv/bin/lightning-ood fit \
    --config benchmarks/configs/lenet_fashionmnist_train.yaml \
    --seed_everything "$s" --trainer.max_epochs "$e" --experiment "$exp" "$@" \
    > "$LOGS/$exp.log" 2>&1; then
    touch "$LOGS/$exp.failed"  # the other lane may be waiting for it
    echo "$exp failed: see $LOGS/$exp.log" >&2
    return 1
  fi
  echo "$exp: $(( $(date +%s) - start )) s" | tee "$LOGS/$exp.done"
}
oe() {  # seed: the OE LeNet of that seed, from scratch or fine-tuned from the plain one
  local s=$1 args=(--data.init_args.outlier_set kmnist --data.init_args.ood_sets "[mnist]")
  if [[ -z $FT ]]; then
    fit "$EPOCHS" "$s" "oe_lenet_e${EPOCHS}_seed$s" "${args[@]}"
    return
  fi
  local base="lenet_e${EPOCHS}_seed$s"
  while [[ ! -f $LOGS/$base.done ]]; do  # the other lane may still train it
    [[ -f $LOGS/$base.failed ]] && { echo "$base failed: no OE fine-tune of it" >&2; return 1; }
    sleep 20
  done
  fit "$FT" "$s" "oeft${FT}_lenet_e${EPOCHS}_seed$s" "${args[@]}" \
    --model.model_kwargs.weights "checkpoints/bench/$base/last.ckpt"
}
mkdir -p "$LOGS"
( fit "$EPOCHS" 1 "lenet_e${EPOCHS}_seed1"; fit "$EPOCHS" 2 "lenet_e${EPOCHS}_seed2"
  fit "$EPOCHS" 3 "lenet_e${EPOCHS}_seed3"; oe 3 ) &
( fit "$EPOCHS" 4 "lenet_e${EPOCHS}_seed4"; fit "$EPOCHS" 5 "lenet_e${EPOCHS}_seed5"; oe 1; oe 2 ) &
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
exit $status
