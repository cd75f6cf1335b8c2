"""models/conv.py: nn.MaxPool2d(2, 2) after nn.Conv2d(in, out, 3, padding=1), as one layer that lays the
convolution out by pixel parity (unfolded, or by Winograd's algorithm from 16 input channels) and has its own vjp."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from models.conv import WINOGRAD_MIN_CHANNELS, ConvPool, parity_conv_pool


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


class ConvThenMaxPool(nn.Conv2d):
    """The two MLX layers ConvPool stands for, with its parameters' names."""

    def __call__(self, x):
        return nn.MaxPool2d(2, 2)(super().__call__(x))


def images_with_blank_areas(shape):
    """Random values with zeroed patches, where the convolution gives equal outputs (tied maxima)."""
    x = mx.random.normal(shape)
    return mx.where(mx.random.uniform(shape=shape[:3] + (1,)) < 0.4, mx.array(0.0), x)


# unfolded: a small case and the CNN's first block; Winograd's: the CNN's second block, and non-square at its threshold
@pytest.mark.parametrize(
    "shape, channels",
    [((3, 6, 8, 2), 4), ((4, 28, 28, 1), 32), ((16, 14, 14, 32), 64), ((8, 10, 12, WINOGRAD_MIN_CHANNELS), 24)],
)
@pytest.mark.parametrize("compiled", [False, True])
def test_same_function_and_gradients_as_conv2d_then_maxpool2d(shape, channels, compiled):
    mx.random.seed(2)
    reference = ConvThenMaxPool(shape[-1], channels, 3, padding=1)
    mx.random.seed(2)
    ours = ConvPool(shape[-1], channels, parity_conv_pool)  # drawn as nn.Conv2d draws them
    assert all(mx.array_equal(a, b) for a, b in zip(reference.parameters().values(), ours.parameters().values()))
    x, cotangent = images_with_blank_areas(shape), mx.random.normal((shape[0], shape[1] // 2, shape[2] // 2, channels))
    expected = forward_and_gradients(reference, compiled)(x, cotangent)
    got = forward_and_gradients(ours, compiled)(x, cotangent)
    # Unfolded: the same products, but OpenBLAS rounds a row of the convolution's matmul differently at
    # another row position, and the gradients sum in another order. Winograd's: other sums of the same
    # terms (its transforms add and subtract inputs first). Both equal within float32 rounding of ~600
    # terms. An output over a blank 3 x 3 neighbourhood is exactly the bias in all three (each of
    # Winograd's outputs combines only products of the inputs under it), so tied maxima are tied alike
    # and the pooling gradient is split alike.
    for name, a, b in zip(["output", "weight gradient", "bias gradient", "input gradient"], expected, got):
        a, b = np.array(a), np.array(b)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max(), err_msg=name)
        assert np.abs(a).max() > 0, name


def test_parity_blocks_max_is_mlx_max_pooling_bit_for_bit():
    """The layer's pooling: a max over the first axis of the four parity blocks gives MaxPool2d's
    output and gradient bit for bit, ties included (the cotangent split evenly among tied maxima)."""
    z = mx.random.normal((4, 10, 12, 3))
    z = mx.where(mx.random.uniform(shape=z.shape) < 0.5, mx.array(0.25), z)  # ties
    blocks = (
        z.reshape(4, 5, 2, 6, 2, 3).transpose(2, 4, 0, 1, 3, 5).reshape(4, 4, 5, 6, 3)
    )  # [2p + q] = z[:, p::2, q::2]
    cotangent = mx.random.normal((4, 5, 6, 3))
    (pooled,), (z_grad,) = mx.vjp(nn.MaxPool2d(2, 2), [z], [cotangent])
    (maxed,), (blocks_grad,) = mx.vjp(lambda b: b.max(axis=0), [blocks], [cotangent])
    assert mx.array_equal(pooled, maxed)
    assert mx.array_equal(z_grad, blocks_grad.reshape(2, 2, 4, 5, 6, 3).transpose(2, 3, 0, 4, 1, 5).reshape(z.shape))


def test_odd_sizes_are_the_two_mlx_layers():
    ours, reference = ConvPool(3, 5, parity_conv_pool), ConvThenMaxPool(3, 5, 3, padding=1)
    reference.update(ours.parameters())
    x = mx.random.normal((2, 7, 9, 3))
    assert ours(x).shape == (2, 3, 4, 5) and mx.array_equal(ours(x), reference(x))


@pytest.mark.parametrize("in_channels", [8, WINOGRAD_MIN_CHANNELS])  # unfolded, Winograd's
def test_compiled_equals_eager_bit_for_bit(in_channels):
    layer, x = ConvPool(in_channels, 16, parity_conv_pool), images_with_blank_areas((4, 10, 6, in_channels))
    cotangent = mx.random.normal((4, 5, 3, 16))
    eager, compiled = (
        forward_and_gradients(layer)(x, cotangent),
        forward_and_gradients(layer, compiled=True)(x, cotangent),
    )
    assert all(mx.array_equal(a, b) for a, b in zip(eager, compiled))
