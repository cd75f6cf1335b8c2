"""models/conv.py: a 3x3 convolution as nine shifted matmuls, against MLX's own."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from models.conv import Conv3x3, conv3x3, max_pool2x2


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


def test_max_pool_matches_mlx_and_its_gradient_where_maxima_are_unique():
    x, cotangent = mx.random.normal((3, 6, 8, 5)), mx.random.normal((3, 3, 4, 5))
    pool = nn.MaxPool2d(2, 2)
    assert mx.array_equal(max_pool2x2(x), pool(x))
    grads = [mx.vjp(f, [x], [cotangent])[1][0] for f in (max_pool2x2, pool)]
    assert mx.array_equal(*grads)  # random normal input: no ties
    compiled = mx.compile(lambda x, c: mx.vjp(max_pool2x2, [x], [c])[1][0])(x, cotangent)
    assert mx.array_equal(compiled, grads[0])


def test_max_pool_gives_each_tied_maximum_the_whole_cotangent():
    x = mx.array([[1.0, 3.0], [3.0, 2.0]]).reshape(1, 2, 2, 1)
    grad = mx.vjp(max_pool2x2, [x], [mx.array([[[[5.0]]]])])[1][0]
    assert grad.reshape(-1).tolist() == [0.0, 5.0, 5.0, 0.0]  # MLX's own would give 2.5 each
