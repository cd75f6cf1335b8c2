import mlx.core as mx
import mlx.nn as nn


def unfold_by_parity(x):
    """(B, H, W, C) -> (B*H*W, 9*C): each pixel's zero-padded 3 x 3 neighbourhood as a row, in the
    order of the weight's (kernel row, kernel column, channel) axes (the copy mx.conv2d makes on the
    CPU), with the rows ordered by pixel parity first: (h % 2, w % 2, b, h // 2, w // 2), not (b, h, w)."""
    b, h, w, c = x.shape
    padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    row, pixel = (w + 2) * c, c
    windows = mx.as_strided(padded, (2, 2, b, h // 2, w // 2, 3, 3, c),
                            (row, pixel, (h + 2) * row, 2 * row, 2 * pixel, row, pixel, 1))
    return windows.reshape(b * h * w, 9 * c)


@mx.custom_function
def conv3x3_by_parity(x, weight):
    """mx.conv2d(x, weight, padding=1), computed as the CPU computes it (unfold, one matmul), laid out
    (4, B, H/2, W/2, out): pixel (2i + p, 2j + q) at [2p + q, :, i, j], so the four inputs of each
    2 x 2 max-pool window lie in four contiguous blocks. Also returns the unfolded x for the vjp."""
    patches = unfold_by_parity(x)
    b, h, w, _ = x.shape
    out = patches @ weight.reshape(weight.shape[0], -1).T
    return out.reshape(4, b, h // 2, w // 2, weight.shape[0]), patches


@conv3x3_by_parity.vjp
def conv3x3_by_parity_vjp(primals, cotangents, outputs):
    """Both gradients from one unfolding of x (MLX's conv2d vjp unfolds x again, and dy too).

        d weight = dy^T @ unfold(x)
        d x_padded[q] = sum over k of D_k[q - k],   D = weight^T @ dy^T   (dy in pixel order)

    (k runs over the 9 kernel offsets, q over pixels; x_padded is x with a border of zeros.)
    D, computed transposed, holds each offset's contribution as a contiguous (in, B, H, W) block;
    nine zero-pads shift them into place, and one fused sum adds them. MLX instead unfolds dy into
    a (B*H*W, 9*out) copy before one matmul.
    """
    weight, (dy, _), (_, patches) = primals[1], cotangents, outputs
    out_channels, _, _, in_channels = weight.shape
    _, b, half_h, half_w, _ = dy.shape
    h, w = 2 * half_h, 2 * half_w
    weight_grad = (dy.reshape(-1, out_channels).T @ patches).reshape(weight.shape)
    dy = dy.reshape(2, 2, b, half_h, half_w, out_channels).transpose(2, 3, 0, 4, 1, 5).reshape(-1, out_channels)
    offsets = (weight.reshape(out_channels, -1).T @ dy.T).reshape(3, 3, in_channels, b, h, w)
    padded = sum(mx.pad(offsets[i, j], [(0, 0), (0, 0), (i, 2 - i), (j, 2 - j)]) for i in range(3) for j in range(3))
    return padded[:, :, 1:h + 1, 1:w + 1].transpose(1, 2, 3, 0), weight_grad


class ConvPool(nn.Conv2d):
    """nn.MaxPool2d(2, 2)(nn.Conv2d(in, out, 3, padding=1)(x)) as one layer, with nn.Conv2d's parameters.

    On the CPU the convolution comes out grouped by pixel parity (conv3x3_by_parity), so the pooling
    is a max over the first axis of contiguous blocks rather than over a strided view (the same
    function, gradient included: the cotangent split evenly among tied maxima), and the vjp unfolds
    x once and copies less (README "Speed"). On a GPU, or for odd sizes, it is the two MLX layers:
    nothing here was measured on a GPU.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def __call__(self, x):
        if mx.default_device() != mx.cpu or x.shape[1] % 2 or x.shape[2] % 2:
            return nn.MaxPool2d(2, 2)(super().__call__(x))
        return (conv3x3_by_parity(x, self.weight)[0] + self.bias).max(axis=0)
