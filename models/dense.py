import math

import mlx.core as mx
import mlx.nn as nn


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
