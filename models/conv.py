import mlx.core as mx
import mlx.nn as nn


def unfold(x):
    """(B, H, W, C) -> (B*H*W, 9*C): each pixel's 3 x 3 neighbourhood, zero-padded, in the order of
    the weight's (kernel row, kernel column, channel) axes; the copy mx.conv2d makes on the CPU."""
    b, h, w, c = x.shape
    padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    row, pixel = (w + 2) * c, c
    windows = mx.as_strided(padded, (b, h, w, 3, 3, c), ((h + 2) * row, row, pixel, row, pixel, 1))
    return windows.reshape(b * h * w, 9 * c)


@mx.custom_function
def conv3x3(x, weight):
    """mx.conv2d(x, weight, padding=1) as the CPU computes it, y = unfold(x) @ weight^T (weight
    flattened to (out, 9*in)), also returning unfold(x) for the vjp below."""
    patches = unfold(x)
    out = patches @ weight.reshape(weight.shape[0], -1).T
    return out.reshape(*x.shape[:3], weight.shape[0]), patches


@conv3x3.vjp
def conv3x3_vjp(primals, cotangents, outputs):
    """Both gradients from one unfolding of x (MLX's conv2d vjp unfolds x again, and dy too).

        d weight = dy^T @ unfold(x)                (the product MLX's own vjp makes: the same bits)
        d x_padded[q] = sum over k of D_k[q - k],   D = weight^T @ dy^T

    (k runs over the 9 kernel offsets, q over pixels; x_padded is x with a border of zeros.)

    D, computed transposed, holds each offset's contribution as a contiguous (in, B, H, W) block;
    nine zero-pads shift them into place, and one fused sum adds them. MLX instead unfolds dy into
    a (B*H*W, 9*out) copy before one matmul; the sums run in another order (equal within rounding).
    """
    weight, (dy, _), (_, patches) = primals[1], cotangents, outputs
    out_channels, _, _, in_channels = weight.shape
    b, h, w, _ = dy.shape
    dy = dy.reshape(-1, out_channels)
    weight_grad = (dy.T @ patches).reshape(weight.shape)
    offsets = (weight.reshape(out_channels, -1).T @ dy.T).reshape(3, 3, in_channels, b, h, w)
    padded = sum(mx.pad(offsets[i, j], [(0, 0), (0, 0), (i, 2 - i), (j, 2 - j)]) for i in range(3) for j in range(3))
    return padded[:, :, 1:h + 1, 1:w + 1].transpose(1, 2, 3, 0), weight_grad


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(in, out, 3, padding=1): the same parameters and forward bits, and on the CPU a
    backward pass that copies less (conv3x3's vjp; the CNN trains 11-15% faster, README "Speed").
    On a GPU it stays nn.Conv2d: MLX has other convolution kernels there, and this was measured on CPUs only."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def __call__(self, x):
        if mx.default_device() != mx.cpu:
            return super().__call__(x)
        return conv3x3(x, self.weight)[0] + self.bias
