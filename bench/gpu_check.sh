#!/usr/bin/env bash
# The GPU check: on a machine with an MLX GPU (Apple silicon, or Linux with an NVIDIA GPU), install the
# right MLX, run the test suite, train each recipe for a few hundred steps on --device gpu and on the
# CPU, reproduce the recorded curves on the GPU (within the cross-device tolerance), and print a table
# of steps per second.
#
#   MLX_ADAGRAD_DATA=/path/to/data bash bench/gpu_check.sh [STEPS]
#
# Installs into a fresh virtual environment in .venv-gpu (NO_INSTALL=1: the active one). DEVICE=cpu
# runs the "GPU" side on the CPU as well: a dry run of this script on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-300}
device=${DEVICE:-gpu}
: "${MLX_ADAGRAD_DATA:?point MLX_ADAGRAD_DATA at the data folder (mnist/, ptb/, tinyshakespeare/)}"

if [ -z "${NO_INSTALL:-}" ]; then
  python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
  if [ "$(uname -s)" = Darwin ]; then requirements=requirements.txt; else requirements=requirements-cuda.txt; fi
  python -m pip install -q -r "$requirements"
fi
[ "$device" = cpu ] || python -c "import mlx.core as mx, sys; sys.exit(0 if mx.is_available(mx.gpu) else 'no MLX GPU')"

python -m pytest -q
out=$(mktemp -d)
declare -A recipes=(
  [mlp]="--task mnist"
  [cnn]="--task mnist --model cnn"
  [lm]="--task lm --dataset tinyshakespeare"
  [ptb]="--task lm --dataset ptb"
)
for name in mlp cnn lm ptb; do
  # shellcheck disable=SC2086  # the recipe's options are words
  python train.py ${recipes[$name]} --device "$device" --steps "$steps" --log-every 10 \
    --log-file "$out/$name-gpu.jsonl" > "$out/$name-gpu.out"
  python train.py ${recipes[$name]} --device cpu --steps $(( steps < 60 ? steps : 60 )) --log-every 10 \
    --log-file "$out/$name-cpu.jsonl" > "$out/$name-cpu.out"  # the CPU's rate only
done
for curve in curves/mnist_mlp_adagrad.jsonl curves/mnist_cnn_adagrad.jsonl curves/lm_tinyshakespeare_adagrad.jsonl \
             curves/lm_ptb_adagrad.jsonl; do
  python train.py --reproduce "$curve" --device "$device" | tail -n 1
done
python - "$out" <<'EOF'
import json, statistics, sys
from pathlib import Path

import mlx.core as mx

info = mx.device_info() if mx.is_available(mx.gpu) else {}
print(f"\nMLX {mx.__version__}, GPU: {info.get('device_name', 'none (a dry run: both columns on the CPU)')}")
print("| recipe | GPU steps/s | CPU steps/s | GPU / CPU | GPU loss at its last logged step |")
print("|---|---|---|---|---|")
for name in ["mlp", "cnn", "lm", "ptb"]:
    rates, last = {}, None
    for device in ["gpu", "cpu"]:
        records = [json.loads(line) for line in (Path(sys.argv[1]) / f"{name}-{device}.jsonl").read_text().splitlines()]
        config, steps = records[0]["config"], [r for r in records[1:] if "loss" in r]
        per_batch = config["batch_size"] * (config["context"] if config["task"] == "lm" else 1)
        key = "tokens_per_s" if config["task"] == "lm" else "samples_per_s"
        rates[device] = statistics.median(r[key] for r in steps[1:]) / per_batch
        last = last or steps[-1]
    print(f"| {name} | {rates['gpu']:.1f} | {rates['cpu']:.1f} | {rates['gpu'] / rates['cpu']:.1f}x | "
          f"{last['loss']:.4f} (step {last['step']}) |")
EOF
