"""Time one Adagrad step of an embedding table, dense against sparse, as the table grows.

    python bench/embedding_step.py [--rows 1e4 1e5 1e6 1e7] [--dim 64] [--batch 4096]
                                   [--rounds 5] [--steps 6]

A batch looks up --batch ids drawn from a Zipf distribution (exponent 1.2, so a few rows come back
many times and most never), and brings the gradient with respect to the looked-up rows. Each variant
turns it into a table update:

  mlx.optimizers dense  the gradient MLX gives nn.Embedding (a scatter-add into a zero table), then
                        mlx.optimizers.Adagrad on the whole table: what an MLX user runs today
  dense                 the same gradient, adagrad.py's Adagrad.update (in place) on the whole table
  sparse                adagrad_sparse.py's SparseAdagrad.update_rows: duplicates summed, only those rows updated
  sparse, no id check   the same without the check that keeps ids outside the table from reading or
                        writing outside it (masked under mx.compile): what the check costs
  torch sparse          nn.Embedding(sparse=True), backward, torch.optim.Adagrad.step (if torch is
                        installed)

All compiled or as the framework runs them, on one thread. Each round runs every variant for
--steps consecutive steps and times all but the first; --steps 1 times single steps in turns, each
finding the caches as another variant left them. A cell is the median ms per step; a ratio is the
median and the quartiles of the per-round ratios. "grad MB" is the size of the gradient each one
builds. Each variant holds its own table and state; mlx.optimizers dense, which allocates both anew
every step, runs up to --stock-rows rows. A variant whose tables would not fit in the memory
available (an estimate, COPIES) is skipped at that size, with a line saying so.
"""

import argparse
import contextlib
import importlib.util
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

import adagrad_sparse  # noqa: E402
from adagrad import Adagrad  # noqa: E402
from adagrad_sparse import SparseAdagrad, SparseEmbedding  # noqa: E402
from recipes import available_memory  # noqa: E402
from training import cpu_tuning  # noqa: E402


class Table(nn.Module):
    def __init__(self, table, sparse):
        super().__init__()
        self.embedding = SparseEmbedding(*table.shape) if sparse else nn.Embedding(*table.shape)
        self.embedding.weight = table


def unchecked(ids, row_gradients, rows):
    """adagrad_sparse._checked without the check: negative ids wrapped, nothing masked."""
    return mx.where(ids < 0, ids + rows, ids), row_gradients, mx.array(True)


@contextlib.contextmanager
def patched(module, name, replacement):
    """module.name replaced while tracing (None: as it is)."""
    original = getattr(module, name)
    setattr(module, name, replacement or original)
    try:
        yield
    finally:
        setattr(module, name, original)


def mlx_stepper(table, ids, row_grads, variant):
    sparse = variant.startswith("sparse")
    model = Table(table, sparse)
    optimizer = (
        optim.Adagrad(0.01) if variant == "mlx.optimizers dense" else (SparseAdagrad if sparse else Adagrad)(0.01)
    )
    optimizer.init(model.trainable_parameters())
    if sparse:
        optimizer.init_rows(model, "embedding.weight")
    state = [model.state, optimizer.state]

    def step(ids, row_grads):
        if sparse:
            optimizer.update(model, {})
            with patched(adagrad_sparse, "_checked", unchecked if variant == "sparse, no id check" else None):
                optimizer.update_rows(model, "embedding.weight", ids, row_grads)
        else:
            grad = mx.zeros_like(model.embedding.weight).at[ids].add(row_grads)  # nn.Embedding's vjp
            optimizer.update(model, {"embedding": {"weight": grad}})

    step = mx.compile(step, inputs=state, outputs=state)
    return lambda: mx.eval(step(ids, row_grads), state)


def torch_stepper(table, ids, row_grads):
    import torch

    warnings.filterwarnings("ignore", "Sparse invariant checks")  # torch's note on every sparse step

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


# Tables of rows x dim float32 each variant holds at its peak: table and state, gradient, new copies.
COPIES = {"sparse": 2, "sparse, no id check": 2, "dense": 4, "torch sparse": 3, "mlx.optimizers dense": 6}


def fitting(names, rows, dim, available):
    """The variants whose tables fit in `available` bytes together, cheapest first, and a line naming
    the others (or "")."""
    table = rows * dim * 4
    need, kept = table, []  # the shared input table
    for name in sorted(names, key=COPIES.get):
        if available is None or need + COPIES[name] * table <= available:
            need += COPIES[name] * table
            kept.append(name)
    skipped = [n for n in names if n not in kept]
    if not skipped:
        return kept, ""
    gib = (table * (1 + sum(COPIES[n] for n in names))) / 2**30
    return (
        kept,
        f"{rows:.0e} rows: skipped {', '.join(skipped)} (all variants need ~{gib:.0f} GiB, "
        f"{available / 2**30:.0f} available)",
    )


def time_rounds(runs, rounds, steps):
    """{name: seconds per step, one median per round}. A round runs every variant for `steps`
    consecutive steps, as a training loop does, and times all but the first, which finds the caches
    as the previous variant left them; with steps=1 it times that first step alone."""
    for run in runs.values():
        run()  # compile
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            if steps > 1:
                run()
            block = []
            for _ in range(max(steps - 1, 1)):
                start = time.perf_counter()
                run()
                block.append(time.perf_counter() - start)
            times[name].append(np.median(block))
    return {name: np.array(t) for name, t in times.items()}


def ratio(slow, fast):
    low, middle, high = np.percentile(slow / fast, [25, 50, 75])
    return f"{middle:.1f}x ({low:.1f}-{high:.1f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="consecutive steps of a variant a round")
    parser.add_argument("--stock-rows", type=float, default=1e6, help="most rows for mlx.optimizers dense")
    args = parser.parse_args()
    tuning = cpu_tuning.enable()
    has_torch = importlib.util.find_spec("torch") is not None
    names = ["mlx.optimizers dense", "dense", "sparse", "sparse, no id check"] + (["torch sparse"] if has_torch else [])
    print(f"mlx {mx.__version__}, compiled kernels: {tuning['kernels']}; {args.batch} Zipf ids x {args.dim}; ", end="")
    print(f"{args.rounds} rounds of {args.steps} steps" + (" (cold caches)" if args.steps == 1 else ""))
    against = [f"{n} / sparse" for n in names if n != "sparse"]
    print(f"| rows | distinct ids | {' | '.join(f'{n} ms' for n in names)} | {' | '.join(against)} | grad MB |")
    print("|---|---|" + "---|" * (len(names) + len(against)) + "---|")
    rng = np.random.default_rng(0)
    notes = []
    for size in args.rows:
        rows = int(size)
        ids = mx.array((rng.zipf(1.2, args.batch) - 1) % rows, mx.int32)
        row_grads = mx.array(rng.standard_normal((args.batch, args.dim)), mx.float32)
        table = mx.random.normal((rows, args.dim))
        candidates = [n for n in names if n != "mlx.optimizers dense" or rows <= args.stock_rows]
        kept, skipped = fitting(candidates, rows, args.dim, available_memory())
        if skipped:
            notes.append(skipped)
        runs = {name: mlx_stepper(table, ids, row_grads, name) for name in kept if name != "torch sparse"}
        if "torch sparse" in kept:
            runs["torch sparse"] = torch_stepper(table, ids, row_grads)
        seconds = time_rounds(runs, args.rounds, args.steps)
        cells = " | ".join(f"{1e3 * np.median(seconds[n]):.2f}" if n in seconds else "-" for n in names)
        slower = [n.removesuffix(" / sparse") for n in against]
        ratios = " | ".join(ratio(seconds[n], seconds["sparse"]) if n in seconds else "-" for n in slower)
        grad_mb = f"{rows * args.dim * 4 / 2**20:,.1f} dense, {args.batch * args.dim * 4 / 2**20:.1f} sparse"
        distinct = len(np.unique(np.array(ids)))
        print(f"| {rows:.0e} | {distinct:,} | {cells} | {ratios} | {grad_mb} |", flush=True)
        del runs, table
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
