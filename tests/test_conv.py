"""models/conv.py: a 3x3 convolution as nine shifted matmuls, against MLX's own."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from models.conv import Conv3x3, conv3x3


def loss_and_grads(conv, x, w, weights):
    return mx.value_and_grad(lambda x, w: (conv(x, w) * weights).sum(), argnums=(0, 1))(x, w)


@pytest.mark.parametrize("shape, out_channels", [((2, 14, 14, 32), 64), ((3, 7, 5, 2), 4), ((1, 1, 1, 3), 2)])
def test_output_and_gradients_match_mlx_conv2d(shape, out_channels):
    mx.random.seed(0)
    x, w = mx.random.normal(shape), mx.random.normal((out_channels, 3, 3, shape[-1]))
    weights = mx.random.normal((*shape[:3], out_channels))  # a cotangent that is not all ones
    mine = [conv3x3(x, w), *loss_and_grads(conv3x3, x, w, weights)[1]]
    theirs = [mx.conv2d(x, w, padding=1),
              *loss_and_grads(lambda x, w: mx.conv2d(x, w, padding=1), x, w, weights)[1]]
    for a, b in zip(mine, theirs):
        assert a.shape == b.shape
        # The same products summed in another order (per tap, then over taps): float32 rounding.
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5 * float(mx.abs(b).max()))


def test_compiled_equals_eager():
    x, w, weights = mx.random.normal((4, 6, 9, 3)), mx.random.normal((5, 3, 3, 3)), mx.random.normal((4, 6, 9, 5))
    eager = loss_and_grads(conv3x3, x, w, weights)
    compiled = mx.compile(lambda x, w: loss_and_grads(conv3x3, x, w, weights))(x, w)
    assert mx.array_equal(eager[0], compiled[0])
    assert all(mx.array_equal(a, b) for a, b in zip(eager[1], compiled[1]))


def test_layer_has_nn_conv2d_parameters_and_draws():
    mx.random.seed(5)
    reference = nn.Conv2d(8, 16, 3, padding=1)
    mx.random.seed(5)
    layer = Conv3x3(8, 16)
    assert set(layer.parameters()) == set(reference.parameters()) == {"weight", "bias"}
    assert mx.array_equal(layer.weight, reference.weight) and mx.array_equal(layer.bias, reference.bias)
    x = mx.random.normal((2, 5, 5, 8))
    np.testing.assert_allclose(np.array(layer(x)), np.array(reference(x)), rtol=1e-5, atol=1e-5)
    assert "bias" not in Conv3x3(8, 16, bias=False)


def test_pooling_before_relu_is_relu_before_pooling_gradients_included():
    """models/cnn.py pools before the ReLU. Ties, common over MNIST's blank background (equal
    convolution outputs), must get the same gradient as in the usual order."""
    z = mx.random.normal((2, 8, 8, 3))
    z = mx.where(mx.random.uniform(shape=z.shape) < 0.5, mx.array(0.25), z)  # tied blocks, some positive
    z[:, :2, :2, :] = -0.5  # and blocks tied below zero
    cotangent = mx.random.normal((2, 4, 4, 3))
    pool = nn.MaxPool2d(2, 2)
    usual = mx.vjp(lambda z: pool(nn.relu(z)), [z], [cotangent])
    swapped = mx.vjp(lambda z: nn.relu(pool(z)), [z], [cotangent])
    assert mx.array_equal(usual[0][0], swapped[0][0]) and mx.array_equal(usual[1][0], swapped[1][0])
