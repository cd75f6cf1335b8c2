"""Time one Adagrad step of an embedding table, dense against sparse, as the table grows.

    python bench/embedding_step.py [--rows 1e4 1e5 1e6 1e7] [--dim 64] [--batch 4096] [--repeats 10]

A batch looks up --batch ids drawn from a Zipf distribution (exponent 1.2, so a few rows come back
many times and most never), and brings the gradient with respect to the looked-up rows. Each variant
turns it into a table update:

  mlx dense     the gradient MLX gives nn.Embedding (a scatter-add into a zero table), then
                Adagrad.update on the whole table: what any MLX optimizer does today
  mlx sparse    Adagrad.update_rows (adagrad.py): duplicates summed, only those rows updated
  torch sparse  nn.Embedding(sparse=True), backward, torch.optim.Adagrad.step (when torch is installed)

All compiled or as the framework runs them, one thread, in turns; each cell is the median step time
in ms; "grad MB" is the size of the gradient each one builds.
"""

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

import cpu_tuning  # noqa: E402
from adagrad import Adagrad, SparseEmbedding  # noqa: E402


class Table(nn.Module):
    def __init__(self, table, sparse):
        super().__init__()
        self.embedding = SparseEmbedding(*table.shape) if sparse else nn.Embedding(*table.shape)
        self.embedding.weight = table


def mlx_stepper(table, ids, row_grads, sparse):
    model, optimizer = Table(table, sparse), Adagrad(0.01)
    optimizer.init(model.trainable_parameters())
    if sparse:
        optimizer.init_rows(model, "embedding.weight")
    state = [model.state, optimizer.state]

    def step(ids, row_grads):
        if sparse:
            optimizer.update(model, {})
            optimizer.update_rows(model, "embedding.weight", ids, row_grads)
        else:
            grad = mx.zeros_like(model.embedding.weight).at[ids].add(row_grads)  # nn.Embedding's vjp
            optimizer.update(model, {"embedding": {"weight": grad}})

    step = mx.compile(step, inputs=state, outputs=state)
    return lambda: mx.eval(step(ids, row_grads), state)


def torch_stepper(table, ids, row_grads):
    import torch

    torch.set_num_threads(1)
    embedding = torch.nn.Embedding(*table.shape, sparse=True)
    with torch.no_grad():
        embedding.weight.copy_(torch.from_numpy(np.array(table)))
    optimizer = torch.optim.Adagrad(embedding.parameters(), lr=0.01)
    ids, row_grads = torch.from_numpy(np.array(ids)).long(), torch.from_numpy(np.array(row_grads))

    def step():
        optimizer.zero_grad(set_to_none=True)
        embedding(ids).backward(row_grads)
        optimizer.step()

    return step


def median_ms(runs, repeats):
    for run in runs.values():
        run()  # compile, warm the caches
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    tuning = cpu_tuning.enable()
    has_torch = importlib.util.find_spec("torch") is not None
    names = ["mlx dense", "mlx sparse"] + (["torch sparse"] if has_torch else [])
    print(f"mlx {mx.__version__}, compiled kernels: {tuning['kernels']}; {args.batch} Zipf ids x {args.dim}")
    print(
        "| rows | distinct ids | "
        + " | ".join(f"{n} ms" for n in names)
        + " | dense / sparse | grad MB dense, sparse |"
    )
    print("|---|---|" + "---|" * len(names) + "---|---|")
    rng = np.random.default_rng(0)
    for size in args.rows:
        rows = int(size)
        ids = mx.array((rng.zipf(1.2, args.batch) - 1) % rows, mx.int32)
        row_grads = mx.array(rng.standard_normal((args.batch, args.dim)), mx.float32)
        table = mx.random.normal((rows, args.dim))
        runs = {
            "mlx dense": mlx_stepper(table, ids, row_grads, False),
            "mlx sparse": mlx_stepper(table, ids, row_grads, True),
        }
        if has_torch:
            runs["torch sparse"] = torch_stepper(table, ids, row_grads)
        ms = median_ms(runs, args.repeats)
        cells = " | ".join(f"{ms[n]:.2f}" for n in names)
        grad_mb = f"{rows * args.dim * 4 / 2**20:,.1f}, {args.batch * args.dim * 4 / 2**20:.1f}"
        distinct = len(np.unique(np.array(ids)))
        print(
            f"| {rows:.0e} | {distinct:,} | {cells} | {ms['mlx dense'] / ms['mlx sparse']:.1f}x | {grad_mb} |",
            flush=True,
        )
        del runs, table


if __name__ == "__main__":
    main()
