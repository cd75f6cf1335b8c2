#!/usr/bin/env bash
# Re-record every run in curves/ (about 2 hours on a 2-core CPU), then draw the plots.
# Needs the data in $MLX_ADAGRAD_DATA (or ~/.cache/mlx-adagrad) and matplotlib for the plots.
set -euo pipefail
cd "$(dirname "$0")/.."
run() { local name=$1; shift; python train.py "$@" --log-file "curves/$name.jsonl" | tee "curves/$name.out"; }
for optimizer in adagrad mlx-adagrad sgd adamw; do
  run "mnist_mlp_$optimizer" --optimizer "$optimizer"
done
run fashion_mlp_adagrad --dataset fashion-mnist
run mnist_cnn_adagrad --model cnn
run mnist_fast_mlp_adagrad --epochs 7 --schedule constant --augment-shift 0 --dropout 0
for dataset in tinyshakespeare ptb; do
  for optimizer in adagrad mlx-adagrad sgd adamw; do
    run "lm_${dataset}_$optimizer" --task lm --dataset "$dataset" --optimizer "$optimizer" --sample 200
  done
done
python curves/plot.py
