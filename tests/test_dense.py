"""models/ops.py::Dense: nn.Linear's function with its weight stored (in, out), so its gradient is row-major."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from models.ops import Dense


def row_major(array):
    mx.eval(array)
    return np.array(array, copy=False).flags["C_CONTIGUOUS"]  # NumPy sees MLX's buffer with its strides


def weight_gradient(layer, x):
    return nn.value_and_grad(layer, lambda layer: (layer(x) ** 2).sum())(layer)[1]["weight"]


def test_same_initial_function_as_nn_linear():
    for bias in (True, False):
        mx.random.seed(3)
        linear = nn.Linear(7, 5, bias=bias)
        mx.random.seed(3)
        dense = Dense(7, 5, bias=bias)
        assert dense.weight.shape == (7, 5)
        assert mx.array_equal(dense.weight, linear.weight.T)  # same draws, transposed
        assert ("bias" in dense) == bias and (not bias or mx.array_equal(dense.bias, linear.bias))
        x = mx.random.normal((4, 7))
        # x @ w and x @ w.T of the same numbers may take different BLAS paths: equal within rounding
        np.testing.assert_allclose(np.array(dense(x)), np.array(linear(x)), rtol=1e-5, atol=1e-6)


def test_weight_gradient_is_row_major_unlike_nn_linear():
    x = mx.random.normal((16, 24))
    linear, dense = nn.Linear(24, 32), Dense(24, 32)
    assert not row_major(weight_gradient(linear, x))  # MLX hands back the transpose of x.T @ dy
    gradient = weight_gradient(dense, x)
    assert row_major(gradient) and gradient.shape == dense.weight.shape
