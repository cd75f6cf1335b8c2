"""Training-step throughput of the recipes: ours compiled vs eager vs PyTorch, in one run.

    python bench/train_step.py [--model mlp cnn lm ptb] [--steps 40]

Every variant trains the same architecture on the same random batch with Adagrad
(ours in MLX; torch.optim.Adagrad(fused=True) in PyTorch, when torch is installed),
at the recipes' defaults (MNIST 128 images; LM 128 wide, 16 windows of 64 tokens, with Tiny
Shakespeare's 4 blocks, 1,024 BPE tokens and a full softmax (lm), or PTB's 2 blocks, 10,261 words
and the class-factored softmax (ptb)), and with train.py's loss, models and compiled kernels
(cpu_tuning.py). MLX runs with OpenBLAS on 1 thread (train.py's bit-reproducible default), on 2, and
on 1 in each of 2 streams that split the batch (train.py --streams 2, also bit-reproducible);
PyTorch on 1 thread and on 2, in a process of its own with the BLAS it brings (MKL in its x86-64
wheels; bench/torch_step.py), not the OpenBLAS that cpu_tuning.py binds in this one. The ratios
compare MLX on one thread with PyTorch on one, and each of MLX's two ways to use 2 cores with
PyTorch on 2 threads.
The variants take turns, a few steps at a time, so load on the machine hits all
alike; each cell is the median step time turned into samples (or tokens) per second.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from adagrad import Adagrad  # noqa: E402
from models.cnn import CNN  # noqa: E402
from models.mlp import MLP  # noqa: E402
from models.ops import CPU  # noqa: E402
from models.transformer import Transformer  # noqa: E402
from training import (
    cpu_tuning,  # noqa: E402
    options,  # noqa: E402
)
from training.step import training_step  # noqa: E402

VOCAB = {"lm": 1024, "ptb": 10261}  # train.py --task lm's vocabularies: BPE default, PTB's words
SOFTMAX = {"lm": "full", "ptb": "class"}  # and its output layers and depths for them
RECIPE = {"lm": options.parse(["--task", "lm"]), "ptb": options.parse(["--task", "lm", "--dataset", "ptb"])}
LAYERS = {name: config.layers for name, config in RECIPE.items()}
CONTEXT, LM_DIM, LM_BATCH, LM_DROPOUT = (getattr(RECIPE["lm"], k) for k in ("context", "dim", "batch_size", "dropout"))


def make_mlx_model(name):
    if name in VOCAB:
        return Transformer(
            VOCAB[name], CONTEXT, LAYERS[name], LM_DIM, dropout=LM_DROPOUT, softmax=SOFTMAX[name], ops=CPU
        )
    return MLP() if name == "mlp" else CNN(ops=CPU)


def make_batch(name, rng):
    if name in VOCAB:
        tokens = rng.integers(0, VOCAB[name], (LM_BATCH, CONTEXT + 1)).astype(np.int32)
        return tokens[:, :-1], tokens[:, 1:]
    return rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 128).astype(np.int32)


def mlx_stepper(model_name, images, labels, compiled, threads, streams=1):
    mx.random.seed(0)
    model = make_mlx_model(model_name)
    optimizer = Adagrad(0.02)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state]
    x, y, scale = mx.array(images), mx.array(labels), mx.array(1 / labels.size, mx.float32)

    # train.py's losses (recipes/): the transformer's own, MLX's cross-entropy for MNIST
    def loss(model, x, y, scale):
        losses = model.nll(x, y) if model_name in VOCAB else nn.losses.cross_entropy(model(x), y, reduction="none")
        return losses.sum() * scale

    step = training_step(model, optimizer, loss, streams)  # train.py's step
    if compiled:
        step = mx.compile(step, inputs=state, outputs=state)

    def run():
        cpu_tuning.set_blas_threads(threads)
        mx.eval(step(x, y, scale), state)

    return run


def start_torch():
    """bench/torch_step.py in a process of its own, where PyTorch uses its own BLAS; (process, version),
    or (None, None) without torch. Not imported here: its matmuls would bind to the OpenBLAS loaded for MLX."""
    if importlib.util.find_spec("torch") is None:
        return None, None
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("torch_step.py"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    hello = ask(child)
    if "torch" not in hello:
        child.wait()
        return None, None
    return child, hello["torch"]


def ask(child, **request):
    """Send a request to bench/torch_step.py (none: read its greeting) and return its answer."""
    if request:
        child.stdin.write(json.dumps(request) + "\n")
        child.stdin.flush()
    answer = child.stdout.readline()
    if not answer:
        raise RuntimeError(f"bench/torch_step.py exited with code {child.wait()}; its error is above")
    return json.loads(answer)


def torch_runner(child, key, **request):
    """Have `child` build what `request` describes; return a callable that runs it there once and
    returns its duration there."""
    ask(child, op="build", key=key, **request)
    return lambda: ask(child, op="run", key=key)["seconds"]


def torch_stepper(child, model_name, images, labels, threads):
    """PyTorch's training step of `model_name` on this batch in `child` (see torch_runner)."""
    request = {"model": model_name, "threads": threads}
    if model_name in VOCAB:
        request.update(
            model="lm",
            vocab=VOCAB[model_name],
            softmax=SOFTMAX[model_name],
            layers=LAYERS[model_name],
            dim=LM_DIM,
            dropout=LM_DROPOUT,
        )
    with tempfile.TemporaryDirectory() as folder:  # the child reads the batch before it answers
        batch_file = str(Path(folder) / "batch.npz")
        np.savez(batch_file, x=images, y=labels)
        return torch_runner(child, f"{model_name} on {images.shape}, {threads} threads", batch=batch_file, **request)


def median_seconds(runs, steps):
    """Median seconds of each callable in `runs` over `steps` calls, after 5 warm-up calls (JIT
    builds, allocator caches). They take turns, 5 calls at a time, so load on the machine hits all alike.
    A callable that returns a number has timed itself (PyTorch's steps, in their own process)."""
    for run in runs.values():
        for _ in range(5):
            run()
    times = {name: [] for name in runs}
    for _ in range(steps // 5):
        for name, run in runs.items():
            for _ in range(5):
                start = time.perf_counter()
                seconds = run()
                times[name].append(time.perf_counter() - start if seconds is None else seconds)
    return {name: float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mlp", "cnn", "lm", "ptb"], choices=["mlp", "cnn", "lm", "ptb"])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    tuning = cpu_tuning.enable()  # as train.py runs on a CPU

    torch_process, torch_version = start_torch()
    rng = np.random.default_rng(0)
    print(
        f"BLAS: {tuning['blas']}; mlx {mx.__version__}; compiled kernels: {tuning['kernels']}; "
        f"torch {torch_version or 'not installed'}"
    )
    names = ["mlx compiled, 1 thread", "mlx compiled, 2 BLAS threads", "mlx compiled, 2 streams", "mlx eager, 1 thread"]
    names += ["torch, fused Adagrad, 1 thread", "torch, fused Adagrad, 2 threads"] if torch_version else []
    ratio_names = ["mlx / torch, 1 thread", "mlx 2 BLAS threads / torch 2 threads", "mlx 2 streams / torch 2 threads"]
    print("| model | unit | " + " | ".join(names + ratio_names) + " |")
    print("|---" * (len(names) + len(ratio_names) + 2) + "|")
    for model_name in args.model:
        images, labels = make_batch(model_name, rng)
        steppers = {
            names[0]: mlx_stepper(model_name, images, labels, True, 1),
            names[1]: mlx_stepper(model_name, images, labels, True, 2),
            names[2]: mlx_stepper(model_name, images, labels, True, 1, streams=2),
            names[3]: mlx_stepper(model_name, images, labels, False, 1),
        }
        if torch_version:
            steppers[names[4]] = torch_stepper(torch_process, model_name, images, labels, 1)
            steppers[names[5]] = torch_stepper(torch_process, model_name, images, labels, 2)
        rate = {name: labels.size / seconds for name, seconds in median_seconds(steppers, args.steps).items()}
        if torch_version:
            pairs = [(names[0], names[4]), (names[1], names[5]), (names[2], names[5])]
            ratios = [f"{rate[a] / rate[b]:.2f}x" for a, b in pairs]
        else:
            ratios = ["-"] * len(ratio_names)
        unit = "tokens/s" if model_name in VOCAB else "samples/s"
        print(
            f"| {model_name} | {unit} | "
            + " | ".join(f"{rate[n]:,.0f}" for n in names)
            + " | "
            + " | ".join(ratios)
            + " |"
        )


if __name__ == "__main__":
    main()
