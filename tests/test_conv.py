"""models/conv.py: nn.Conv2d(in, out, 3, padding=1) with a vjp that unfolds its input once."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from models.conv import Conv3x3


def forward_and_gradients(layer, compiled=False):
    """(x, cotangent) -> the layer's output and the gradients of sum(output * cotangent) in its
    weight, bias and input."""
    def loss(params, x, cotangent):
        layer.update(params)
        return (layer(x) * cotangent).sum()

    def run(x, cotangent):
        params, input_grad = mx.grad(loss, argnums=(0, 1))(layer.trainable_parameters(), x, cotangent)
        return layer(x), params["weight"], params["bias"], input_grad

    return mx.compile(run) if compiled else run


@pytest.mark.parametrize("shape, channels", [((3, 5, 7, 2), 4), ((16, 14, 14, 32), 64), ((4, 28, 28, 1), 32)])
@pytest.mark.parametrize("compiled", [False, True])
def test_same_function_and_gradients_as_nn_conv2d(shape, channels, compiled):
    mx.random.seed(2)
    reference = nn.Conv2d(shape[-1], channels, 3, padding=1)
    mx.random.seed(2)
    ours = Conv3x3(shape[-1], channels)
    assert all(mx.array_equal(a, b) for a, b in zip(reference.parameters().values(), ours.parameters().values()))
    x, cotangent = mx.random.normal(shape), mx.random.normal(shape[:3] + (channels,))
    expected = forward_and_gradients(reference, compiled)(x, cotangent)
    got = forward_and_gradients(ours, compiled)(x, cotangent)
    for name, a, b in zip(["output", "weight gradient", "bias gradient"], expected, got):
        assert mx.array_equal(a, b), name  # the same unfolding and products as MLX's CPU convolution
    # The input gradient adds the same products in another order (per kernel offset, then across
    # offsets, where MLX adds all 9 x out at once): equal within float32 rounding of sums of ~600 terms.
    np.testing.assert_allclose(np.array(got[3]), np.array(expected[3]), rtol=1e-5, atol=1e-5)
    assert not mx.array_equal(got[3], mx.zeros_like(got[3]))


def test_compiled_equals_eager_bit_for_bit():
    layer, x, cotangent = Conv3x3(8, 16), mx.random.normal((4, 9, 6, 8)), mx.random.normal((4, 9, 6, 16))
    eager, compiled = forward_and_gradients(layer)(x, cotangent), forward_and_gradients(layer, compiled=True)(x, cotangent)
    assert all(mx.array_equal(a, b) for a, b in zip(eager, compiled))
