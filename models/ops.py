"""What the models compute with, in one place: Dense, the linear layer every model uses, and Ops,
the operations chosen by device: MLX's own (STOCK, right on every device) or the formulations
written for MLX's CPU kernels (CPU: models/cpu_ops.py and models/conv.py; same parameters, same
results within float32 rounding, faster on a CPU)."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from models.conv import parity_conv_pool, stock_conv_pool
from models.cpu_ops import causal_attention, softmax_cross_entropy, stock_attention, stock_cross_entropy


class Dense(nn.Module):
    """y = x @ w + b, with w stored (in, out): nn.Linear transposed.

    nn.Linear stores w as (out, in) and computes x @ w.T; MLX returns its gradient as the transpose
    of x.T @ dy, a column-major view, so the optimizer's elementwise update of w reads it across
    rows (bench/step_costs.py times both; docs/performance.md).
    Stored (in, out), the gradient x.T @ dy is row-major like w and its optimizer state.
    Initialised as nn.Linear (uniform in +-1/sqrt(in), drawn as (out, in)), so the same seed gives
    the same function.
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True):
        super().__init__()
        scale = math.sqrt(1.0 / input_dims)
        self.weight = mx.contiguous(mx.random.uniform(-scale, scale, (output_dims, input_dims)).T)
        if bias:
            self.bias = mx.random.uniform(-scale, scale, (output_dims,))

    def __call__(self, x):
        if "bias" in self:
            return mx.addmm(self.bias, x, self.weight)
        return x @ self.weight


@dataclass(frozen=True)
class Ops:
    name: str
    attention: Callable  # (q, k, v, scale) -> causal attention
    cross_entropy: Callable  # (logits, targets) -> each target's loss
    conv_pool: Callable  # (ConvPool layer, images) -> max-pooled 3x3 convolution


STOCK = Ops("MLX stock ops", stock_attention, stock_cross_entropy, stock_conv_pool)
CPU = Ops("CPU formulations", causal_attention, softmax_cross_entropy, parity_conv_pool)


def for_device(device: str, stock: bool = False) -> Ops:
    """CPU for a step on the CPU, unless `stock` (train.py --stock-ops); STOCK elsewhere."""
    return CPU if device == "cpu" and not stock else STOCK
