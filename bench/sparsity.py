"""Sparsity from L1: plain Adagrad, proximal Adagrad(l1=...) and AdagradDA(l1=...) on sparse regression.

    python bench/sparsity.py [--features 1000] [--informative 20] [--epochs 20]

Synthetic least squares: y = X w* + noise, with w* nonzero on --informative of --features
coordinates. Each optimizer trains a linear model from w = 0 with mini-batches, the same
data order for all, at its learning rate; the table gives the weights that are exactly
zero, how many of w*'s nonzeros survive, and the test mean squared error (the noise
alone scores 0.01).
"""

import argparse
import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from adagrad import Adagrad  # noqa: E402
from adagrad_da import AdagradDA  # noqa: E402
from training import cpu_tuning  # noqa: E402

NOISE = 0.1


def make_data(features, informative, samples, seed=0):
    rng = np.random.default_rng(seed)
    w_true = np.zeros(features, np.float32)
    w_true[rng.choice(features, informative, replace=False)] = rng.normal(0, 1, informative)
    x = rng.normal(0, 1, (samples, features)).astype(np.float32)
    y = x @ w_true + NOISE * rng.normal(0, 1, samples).astype(np.float32)
    return x, y, w_true


def train(optimizer, x, y, epochs, batch_size=64, seed=0):
    model = nn.Linear(x.shape[1], 1, bias=False)
    model.weight = mx.zeros_like(model.weight)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(xb, yb):
        loss, grads = nn.value_and_grad(model, lambda m, xb, yb: mx.mean(mx.square(m(xb)[:, 0] - yb)))(model, xb, yb)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for i in range(0, len(y), batch_size):
            batch = order[i : i + batch_size]
            mx.eval(step(mx.array(x[batch]), mx.array(y[batch])), state)
    return np.array(model.weight[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=1000)
    parser.add_argument("--informative", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    cpu_tuning.enable()  # as train.py runs on a CPU

    x, y, w_true = make_data(args.features, args.informative, 2 * args.samples)
    (x_train, x_test), (y_train, y_test) = np.split(x, 2), np.split(y, 2)
    runs = [("Adagrad", "-", lambda: Adagrad(0.1))]
    runs += [("Adagrad proximal", l1, lambda l1=l1: Adagrad(0.1, l1=l1)) for l1 in (0.01, 0.03, 0.1)]
    runs += [("AdagradDA", l1, lambda l1=l1: AdagradDA(0.1, l1=l1)) for l1 in (0.01, 0.03, 0.1)]

    print(
        f"{args.features} features, {args.informative} informative, {args.samples} training samples, "
        f"{args.epochs} epochs, batch 64, lr 0.1"
    )
    print("| optimizer | l1 | exact zeros | informative kept | test MSE |")
    print("|---|---|---|---|---|")
    for name, l1, make in runs:
        w = train(make(), x_train, y_train, args.epochs)
        zeros, kept = (w == 0).mean(), ((w != 0) & (w_true != 0)).sum()
        mse = float(np.mean((x_test @ w - y_test) ** 2))
        print(f"| {name} | {l1} | {100 * zeros:.1f}% | {kept} of {args.informative} | {mse:.4f} |")


if __name__ == "__main__":
    main()
