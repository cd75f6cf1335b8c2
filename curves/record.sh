#!/usr/bin/env bash
# Re-record every run in curves/ (about 1.5 hours on a 2-core CPU), then draw the plots.
# Needs the data in $MLX_ADAGRAD_DATA (or ~/.cache/mlx-adagrad) and matplotlib for the plots.
set -euo pipefail
cd "$(dirname "$0")/.."
run() { local name=$1; shift; python train.py "$@" --log-file "curves/$name.jsonl" | tee "curves/$name.out"; }
for optimizer in adagrad mlx-adagrad sgd adamw; do
  run "mnist_mlp_$optimizer" --optimizer "$optimizer"
done
run fashion_mlp_adagrad --dataset fashion-mnist
run mnist_cnn_adagrad --model cnn
# The language models two at a time, one per core (each uses one core: train.py pins OpenBLAS to one thread).
for dataset in tinyshakespeare ptb; do
  for pair in "adagrad adamw" "mlx-adagrad sgd"; do
    pids=()
    for optimizer in $pair; do
      run "lm_${dataset}_$optimizer" --task lm --dataset "$dataset" --optimizer "$optimizer" --sample 200 > /dev/null &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done  # a failed run stops the script (set -e)
  done
done
# Each recipe's Adagrad run again on both cores alone (--streams 2), the way to meet the 10-minute targets on a slower CPU.
for dataset in tinyshakespeare ptb; do
  run "lm_${dataset}_adagrad_streams2" --task lm --dataset "$dataset" --optimizer adagrad --streams 2 --sample 200 > /dev/null
done
# PTB with a hashed-bigram input table of 2^20 rows, one pass: the tables updated densely, then only where a batch
# looked them up (--sparse-embeddings): the same bits, in a fraction of the time.
run lm_ptb_bigrams_dense --task lm --dataset ptb --hash-buckets 1048576 --untied --epochs 1 > /dev/null
run lm_ptb_bigrams_sparse --task lm --dataset ptb --hash-buckets 1048576 --sparse-embeddings --epochs 1 > /dev/null
python curves/plot.py
