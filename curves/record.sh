#!/usr/bin/env bash
# Re-record every run in curves/ (about 1.5 hours on a 2-core CPU), then draw the plots.
# Needs the data in $MLX_ADAGRAD_DATA (or ~/.cache/mlx-adagrad) and matplotlib for the plots.
set -euo pipefail
cd "$(dirname "$0")/.."
run() { local name=$1; shift; python train.py "$@" --log-file "curves/$name.jsonl" --overwrite | tee "curves/$name.out"; }
for optimizer in adagrad mlx-adagrad sgd adamw; do
  run "mnist_mlp_$optimizer" --optimizer "$optimizer"
done
run fashion_mlp_adagrad --dataset fashion-mnist
run mnist_cnn_adagrad --model cnn
# The language models one at a time: on a CPU each splits its batches over both cores (--streams 2, the default).
# Each optimizer at its tuned rate: the option table's, but AdamW's on Tiny Shakespeare and SGD's on PTB
# (docs/defaults.md).
for dataset in tinyshakespeare ptb; do
  for optimizer in adagrad mlx-adagrad adamw sgd; do
    case $dataset/$optimizer in
      tinyshakespeare/adamw) rate=(--lr 1e-3) ;;
      ptb/sgd) rate=(--lr 0.6) ;;
      *) rate=() ;;
    esac
    run "lm_${dataset}_$optimizer" --task lm --dataset "$dataset" --optimizer "$optimizer" "${rate[@]}" --sample 200 > /dev/null
  done
done
# PTB with a hashed-bigram input table of 2^20 rows, one pass: the tables updated densely, then only where a batch
# looked them up (--sparse-embeddings): the same bits, in a fraction of the time.
# Their rate, warmup, streams, batch and dropout as recorded.
pinned=(--lr 0.02 --warmup 0 --streams 1 --batch-size 16 --dropout 0)
run lm_ptb_bigrams_dense --task lm --dataset ptb --hash-buckets 1048576 --untied --epochs 1 "${pinned[@]}" > /dev/null
run lm_ptb_bigrams_sparse --task lm --dataset ptb --hash-buckets 1048576 --sparse-embeddings --epochs 1 "${pinned[@]}" > /dev/null
python curves/plot.py
