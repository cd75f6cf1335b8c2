"""Fine-tune a language model with mlx-lm's trainer and adagrad.py, beside mlx.optimizers.Adagrad.

    pip install mlx-lm==0.32.2
    python examples/mlx_lm_finetune.py                 # LoRA and full fine-tuning in float32, float16, bfloat16
    python examples/mlx_lm_finetune.py --steps 100

mlx-lm's command line takes only its own optimizers, but its Python trainer, mlx_lm.tuner.train, takes any
mlx.optimizers.Optimizer and compiles its step over [model.state, optimizer.state, mx.random.state]. The
model here is a small Llama built in code (2 layers, width 64, 256 tokens: no download), and the data
sequences of tokens that count up from a random start by a random stride, which a model learns in a few
steps. The script fine-tunes it with both optimizers and prints, for each way and dtype, the last loss and
how many trained parameters are not finite; then it stops one run halfway, saves the adapters and the
optimizer state (mlx-lm saves only the adapters), resumes, and checks the result against the run that
went on. docs/mlx-lm.md explains the numbers.
"""

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.tuner import TrainingArgs, train
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.utils import linear_to_lora_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # adagrad.py, as a user's copy beside their script
from adagrad import Adagrad  # noqa: E402

OPTIMIZERS = {"mlx.optimizers.Adagrad": optim.Adagrad, "adagrad.py": Adagrad}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}
BATCH, LENGTH = 4, 32


def small_llama(seed: int = 0) -> llama.Model:
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256,
    )  # fmt: skip
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def counting_sequences(count: int = 64, seed: int = 0) -> list:
    """Sequences t, t + s, t + 2s, ... (mod 256) with a random start t and stride s in 1..4."""
    rng = np.random.default_rng(seed)
    starts, strides = rng.integers(0, 256, count), rng.integers(1, 5, count)
    return [((start + stride * np.arange(LENGTH)) % 256).tolist() for start, stride in zip(starts, strides)]


def batches_from(start: int):
    """mlx-lm's iterate_batches, but in a fixed order from batch `start` on, so that a resumed run sees the
    batches the uninterrupted one would (mlx-lm's own draws a new random order each time it is called)."""

    def iterate_batches(dataset, batch_size, max_seq_length, loop=False, comm_group=None, seed=None):
        index = start
        while True:
            rows = [dataset[(index * batch_size + j) % len(dataset)] for j in range(batch_size)]
            lengths = mx.array([[0, len(row)] for row in rows])
            yield mx.array(np.array(rows, np.int32)), lengths
            index += 1

    return iterate_batches


class Losses(TrainingCallback):
    def __init__(self):
        self.losses = []

    def on_train_loss_report(self, info):
        self.losses.append(info["train_loss"])


def prepare(mode: str, dtype) -> llama.Model:
    """The model to fine-tune: all of it ("full"), or LoRA adapters on both blocks ("lora"), in `dtype`."""
    model = small_llama()
    if mode == "lora":
        model.freeze()
        linear_to_lora_layers(model, 2, LORA)
    model.set_dtype(dtype)  # the base weights and, for LoRA, the adapters
    return model


def finetune(model, optimizer, steps: int, start: int = 0) -> list:
    """mlx_lm.tuner.train for `steps` steps from batch `start`; the loss of each step."""
    losses = Losses()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        args = TrainingArgs(
            batch_size=BATCH, iters=steps, steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
            max_seq_length=LENGTH, adapter_file=str(Path(tmp) / "adapters.safetensors"),
        )  # fmt: skip
        train(model, optimizer, counting_sequences(), args=args, iterate_batches=batches_from(start),
              training_callback=losses)  # fmt: skip
    return losses.losses


def not_finite(model) -> tuple:
    """(trained parameters that are not finite, trained parameters)."""
    weights = [v for _, v in tree_flatten(model.trainable_parameters())]
    return sum((~mx.isfinite(v)).sum().item() for v in weights), sum(v.size for v in weights)


def compare(steps: int, lr: float, eps: float) -> list:
    """One row per way, dtype and optimizer: its losses, final weights and non-finite count."""
    rows = []
    for mode in ("lora", "full"):
        for dtype_name, dtype in DTYPES.items():
            for name, make in OPTIMIZERS.items():
                model = prepare(mode, dtype)
                optimizer = make(lr, eps=eps) if name == "adagrad.py" else make(lr)
                losses = finetune(model, optimizer, steps)
                bad, total = not_finite(model)
                weights = dict(tree_flatten(model.trainable_parameters()))
                rows.append(dict(mode=mode, dtype=dtype_name, optimizer=name, losses=losses, weights=weights,
                                 not_finite=bad, trained=total))  # fmt: skip
    return rows


def resume_matches(steps: int, lr: float) -> bool:
    """Stop a LoRA run halfway, save adapters and optimizer state, resume in a fresh model: the weights
    equal the uninterrupted run's, bit for bit."""
    whole = prepare("lora", mx.float32)
    finetune(whole, Adagrad(lr), 2 * steps)
    with tempfile.TemporaryDirectory() as tmp:
        half, optimizer = prepare("lora", mx.float32), Adagrad(lr)
        finetune(half, optimizer, steps)
        mx.save_safetensors(f"{tmp}/adapters.safetensors", dict(tree_flatten(half.trainable_parameters())))
        mx.save_safetensors(f"{tmp}/optimizer.safetensors", dict(tree_flatten(optimizer.state)))
        resumed, optimizer = prepare("lora", mx.float32), Adagrad(lr)
        resumed.load_weights(f"{tmp}/adapters.safetensors", strict=False)
        optimizer.state = tree_unflatten(list(mx.load(f"{tmp}/optimizer.safetensors").items()))
        finetune(resumed, optimizer, steps, start=steps)
    ours, theirs = dict(tree_flatten(resumed.trainable_parameters())), dict(tree_flatten(whole.trainable_parameters()))
    return ours.keys() == theirs.keys() and all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)


def float32_equal(rows, mode: str) -> bool:
    """Whether both optimizers gave the same losses and weights, bit for bit, in float32."""
    mine, mlx = (next(r for r in rows if (r["mode"], r["dtype"], r["optimizer"]) == (mode, "float32", o))
                 for o in ("adagrad.py", "mlx.optimizers.Adagrad"))  # fmt: skip
    same_weights = all(mx.array_equal(mine["weights"][k], mlx["weights"][k]).item() for k in mine["weights"])
    return mine["losses"] == mlx["losses"] and same_weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="fine-tuning steps of each run (default: 50)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of both optimizers (default: 0.01)")
    parser.add_argument("--eps", type=float, default=1e-8, help="adagrad.py's eps (default: 1e-8, MLX's)")
    args = parser.parse_args(argv)
    rows = compare(args.steps, args.lr, args.eps)
    print(
        f"mlx-lm's trainer, {args.steps} steps, lr {args.lr}, a 2-layer Llama of width 64, device {mx.default_device()}"
    )
    print("| fine-tuning | dtype | optimizer | last loss | trained parameters not finite |")
    print("|---|---|---|---|---|")
    for r in rows:
        loss = f"{r['losses'][-1]:.4f}" if r["losses"] else "-"
        print(f"| {r['mode']} | {r['dtype']} | {r['optimizer']} | {loss} | {r['not_finite']:,} of {r['trained']:,} |")
    for mode in ("lora", "full"):
        print(
            f"{mode}, float32: both optimizers' losses and weights are bit for bit equal: {float32_equal(rows, mode)}"
        )
    print(f"LoRA resumed from saved adapters and optimizer state equals the uninterrupted run: "
          f"{resume_matches(args.steps // 2, args.lr)}")  # fmt: skip


if __name__ == "__main__":
    main()
