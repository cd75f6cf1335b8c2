"""Training-step throughput of the MNIST recipes: ours compiled vs eager vs PyTorch, in one run.

    python bench/train_step.py [--model mlp cnn] [--batch-size 128] [--steps 50]

Every variant trains the same architecture on the same random batch with Adagrad
(ours in MLX; torch.optim.Adagrad(fused=True) in PyTorch, when torch is installed).
The variants take turns, a few steps at a time, so load on the machine hits all
alike; each cell is the median step time turned into samples/s.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import blas  # noqa: E402

BLAS = blas.load_optimized_blas()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from adagrad import Adagrad  # noqa: E402
from models.cnn import CNN  # noqa: E402
from models.mlp import MLP  # noqa: E402


def mlx_stepper(model_name, images, labels, compiled):
    mx.random.seed(0)
    model = MLP() if model_name == "mlp" else CNN()
    optimizer = Adagrad(0.02)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state]
    x, y = mx.array(images), mx.array(labels)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    if compiled:
        step = mx.compile(step, inputs=state, outputs=state)

    def run():
        mx.eval(step(x, y), state)

    return run


def torch_stepper(model_name, images, labels):
    import torch
    from torch import nn as tnn

    torch.manual_seed(0)
    if model_name == "mlp":
        model = tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 512), tnn.ReLU(), tnn.Dropout(0.2),
                               tnn.Linear(512, 512), tnn.ReLU(), tnn.Dropout(0.2), tnn.Linear(512, 10))
    else:
        model = tnn.Sequential(tnn.Conv2d(1, 32, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
                               tnn.Conv2d(32, 64, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
                               tnn.Linear(7 * 7 * 64, 128), tnn.ReLU(), tnn.Dropout(0.25), tnn.Linear(128, 10))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.02, eps=1e-8, fused=True)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # NCHW, as torch's conv wants
    y = torch.from_numpy(labels).long()

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = tnn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, args.batch_size).astype(np.int32)

    print(f"BLAS: {BLAS}; mlx {mx.__version__}; torch {torch_version or 'not installed'} "
          f"({torch.get_num_threads() if torch_version else '-'} threads); batch {args.batch_size}")
    names = ["mlx compiled (ours)", "mlx eager (ours)"] + (["torch eager, fused Adagrad"] if torch_version else [])
    print("| model | " + " | ".join(names) + " | compiled / torch |")
    print("|---" * (len(names) + 2) + "|")
    for model_name in args.model:
        steppers = {names[0]: mlx_stepper(model_name, images, labels, True),
                    names[1]: mlx_stepper(model_name, images, labels, False)}
        if torch_version:
            steppers[names[2]] = torch_stepper(model_name, images, labels)
        times = {name: [] for name in steppers}
        for run in steppers.values():
            for _ in range(5):  # warm up: JIT builds, allocator caches
                run()
        for _ in range(args.steps // 5):
            for name, run in steppers.items():
                for _ in range(5):
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
        rate = {name: args.batch_size / float(np.median(t)) for name, t in times.items()}
        ratio = f"{rate[names[0]] / rate[names[2]]:.2f}x" if torch_version else "-"
        print(f"| {model_name} | " + " | ".join(f"{rate[n]:,.0f} samples/s" for n in names) + f" | {ratio} |")


if __name__ == "__main__":
    main()
