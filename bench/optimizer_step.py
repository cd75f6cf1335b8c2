"""Time one Adagrad step on N float32 parameters against the memory-bandwidth floor.

    python bench/optimizer_step.py [--sizes 1e5 1e6 1e7] [--repeats 30] [--cpu-tuning on|off]

An Adagrad step reads w, g, v and writes w, v: 20 bytes per parameter. The floor
is 20 * N / bandwidth, with the bandwidth of one thread measured in this run by
an in-place NumPy add (12 bytes per element) on arrays of the same size.
Variants run interleaved, round after round, and each cell is the median, so a
noisy neighbour slows them all alike.
"""

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

from adagrad import Adagrad  # noqa: E402
from training import cpu_tuning  # noqa: E402


def numpy_floor_ms(n, repeats):
    """Milliseconds for 20 bytes per parameter at one thread's in-place bandwidth."""
    a = np.ones(n, np.float32)
    b = np.ones(n, np.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.add(a, b, out=a)
        times.append(time.perf_counter() - start)
    bandwidth = 12 * n / np.median(times)
    return 1e3 * 20 * n / bandwidth, bandwidth


def mlx_stepper(make_optimizer, n, compiled):
    """A closure that runs one optimizer step; it holds the only reference to each buffer,
    as a training loop does, so MLX can update w and v in place."""
    optimizer = make_optimizer()
    box = {"params": {"w": mx.random.normal((n,))}}
    grads = {"w": 1e-2 * mx.random.normal((n,))}
    optimizer.init(box["params"])
    mx.eval(box, grads, optimizer.state)

    def apply(grads, params):
        return optimizer.apply_gradients(grads, params)

    if compiled:
        apply = mx.compile(apply, inputs=[optimizer.state], outputs=[optimizer.state])

    def step():
        box["params"] = apply(grads, box["params"])
        mx.eval(box["params"], optimizer.state)

    return step


def torch_stepper(n):
    import torch

    torch.set_num_threads(1)
    w = torch.nn.Parameter(torch.randn(n))
    w.grad = 1e-2 * torch.randn(n)
    optimizer = torch.optim.Adagrad([w], lr=0.01, eps=1e-8, fused=True)
    return optimizer.step


def time_round_robin(steppers, repeats, warmup=3):
    for step in steppers.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steppers}
    for _ in range(repeats):
        for name, step in steppers.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--cpu-tuning",
        choices=["on", "off"],
        default="on",
        help="on: as train.py runs (cpu_tuning.py); off: MLX as it comes, as in a project of yours",
    )
    args = parser.parse_args()
    kernels = cpu_tuning.enable(args.cpu_tuning == "on")["kernels"]

    variants = {
        "ours eager": (lambda: Adagrad(0.01), False),
        "ours compiled": (lambda: Adagrad(0.01), True),
        "mlx eager": (lambda: optim.Adagrad(0.01), False),
        "mlx compiled": (lambda: optim.Adagrad(0.01), True),
    }
    has_torch = importlib.util.find_spec("torch") is not None

    print(
        f"mlx {mx.__version__}, {mx.default_device()}, cpu tuning {args.cpu_tuning}, compiled kernels: {kernels}; "
        f"median of {args.repeats} steps"
    )
    names = list(variants) + (["torch fused (1 thread)"] if has_torch else [])
    header = f"| {'N':>8} | {'floor ms':>8} | " + " | ".join(f"{n:>22}" for n in names) + " |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for size in args.sizes:
        n = int(size)
        floor_ms, bandwidth = numpy_floor_ms(n, args.repeats)
        steppers = {name: mlx_stepper(make, n, compiled) for name, (make, compiled) in variants.items()}
        if has_torch:
            steppers["torch fused (1 thread)"] = torch_stepper(n)
        ms = time_round_robin(steppers, args.repeats)
        cells = [f"{ms[name]:8.2f} ms ({floor_ms / ms[name]:4.2f})" for name in names]
        print(f"| {n:8.0e} | {floor_ms:8.2f} | " + " | ".join(f"{c:>22}" for c in cells) + " |")
    print(f"(fraction of the floor in brackets; floor from {bandwidth / 1e9:.0f} GB/s measured at the last N)")


if __name__ == "__main__":
    main()
