import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
# Networks", 2016): a 2 x 2 block of a 3 x 3 convolution's output from the 4 x 4 input tile d under it,
#     Y = A^T [(G g G^T) * (B^T d B)] A,
# 16 multiplies per tile and channel pair instead of 36. On flattened tiles the two-sided products
# are Kronecker products: B^T d B = kron(B^T, B^T) @ d.flat, and so on.
_B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
INPUT_TRANSFORM = mx.array(np.kron(_B_T, _B_T))  # (16, 16)
KERNEL_TRANSFORM = mx.array(np.kron(_G, _G))  # (16, 9)
OUTPUT_TRANSFORM = mx.array(np.kron(_A_T, _A_T))  # (4, 16)
WINOGRAD_MIN_CHANNELS = 16  # faster at 32 input channels (the CNN's second block), slower at 1


def unfold_by_parity(x):
    """(B, H, W, C) -> (B*H*W, 9*C): each pixel's zero-padded 3 x 3 neighbourhood as a row, in the
    order of the weight's (kernel row, kernel column, channel) axes (the copy mx.conv2d makes on the
    CPU), with the rows ordered by pixel parity first: (h % 2, w % 2, b, h // 2, w // 2), not (b, h, w)."""
    b, h, w, c = x.shape
    padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    row, pixel = (w + 2) * c, c
    windows = mx.as_strided(
        padded, (2, 2, b, h // 2, w // 2, 3, 3, c), (row, pixel, (h + 2) * row, 2 * row, 2 * pixel, row, pixel, 1)
    )
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
    return padded[:, :, 1 : h + 1, 1 : w + 1].transpose(1, 2, 3, 0), weight_grad


def winograd_tiles(x):
    """(B, H, W, C) -> (16, B*H/2*W/2*C): the zero-padded 4 x 4 input tile under each 2 x 2 output
    block, flattened (tile row, tile column) first, one strided copy."""
    b, h, w, c = x.shape
    padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    row, pixel = (w + 2) * c, c
    tiles = mx.as_strided(padded, (4, 4, b, h // 2, w // 2, c), (row, pixel, (h + 2) * row, 2 * row, 2 * pixel, 1))
    return tiles.reshape(16, -1)


def winograd_kernel(weight):
    """(out, 3, 3, in) -> (16, in, out): G g G^T for every channel pair."""
    out_channels, _, _, in_channels = weight.shape
    flat = weight.transpose(1, 2, 3, 0).reshape(9, -1)
    return (KERNEL_TRANSFORM @ flat).reshape(16, in_channels, out_channels)


@mx.custom_function
def winograd_by_parity(x, weight):
    """conv3x3_by_parity(x, weight), with its layout, by Winograd's F(2x2, 3x3): each 2 x 2 output
    block is a max-pool window. Per tile, with V = B^T d B (all channels) and U = G g G^T:

        M = V @ U   (16 products of (tiles, in) by (in, out))      Y = A^T M A

    Each transform is one matmul by a Kronecker product; 0.44x the multiplies of the direct
    convolution's one matmul, in products only `in` deep. Also returns V for the vjp."""
    b, h, w, c = x.shape
    transformed = (INPUT_TRANSFORM @ winograd_tiles(x)).reshape(16, -1, c)
    products = transformed @ winograd_kernel(weight)
    out = OUTPUT_TRANSFORM @ products.reshape(16, -1)
    return out.reshape(4, b, h // 2, w // 2, weight.shape[0]), transformed


@winograd_by_parity.vjp
def winograd_by_parity_vjp(primals, cotangents, outputs):
    """Each step of the forward transposed:

        dM = A dY A^T        d weight = G^T (V^T @ dM) G        dV = dM @ U^T        d tile = B dV B^T

    and each input pixel's gradient is the sum over the (up to four) overlapping tiles that hold it:
    a tile's 2 x 2 quarters shift onto a grid of 2 x 2 pixel blocks, four zero-pads and one sum."""
    (x, weight), (dy, _), (_, transformed) = primals, cotangents, outputs
    b, h, w, c = x.shape
    out_channels = weight.shape[0]
    products_grad = (OUTPUT_TRANSFORM.T @ dy.reshape(4, -1)).reshape(16, -1, out_channels)
    kernel_grad = transformed.swapaxes(1, 2) @ products_grad
    weight_grad = (
        (KERNEL_TRANSFORM.T @ kernel_grad.reshape(16, -1)).reshape(3, 3, c, out_channels).transpose(3, 0, 1, 2)
    )
    transformed_grad = products_grad @ winograd_kernel(weight).swapaxes(1, 2)
    # tile row 2 * r_hi + r_lo, column 2 * c_hi + c_lo lands on padded pixel (2 (i + r_hi) + r_lo, 2 (j + c_hi) + c_lo)
    tiles_grad = (INPUT_TRANSFORM.T @ transformed_grad.reshape(16, -1)).reshape(2, 2, 2, 2, b, h // 2, w // 2, c)
    blocks = sum(
        mx.pad(tiles_grad[r_hi, :, c_hi], [(0, 0)] * 3 + [(r_hi, 1 - r_hi), (c_hi, 1 - c_hi), (0, 0)])
        for r_hi in range(2)
        for c_hi in range(2)
    )  # (r_lo, c_lo, b, h/2 + 1, w/2 + 1, c)
    padded = blocks.transpose(2, 3, 0, 4, 1, 5).reshape(b, h + 2, w + 2, c)
    return padded[:, 1 : h + 1, 1 : w + 1], weight_grad


class ConvPool(nn.Conv2d):
    """nn.MaxPool2d(2, 2)(nn.Conv2d(in, out, 3, padding=1)(x)) as one layer, with nn.Conv2d's parameters,
    computed by `conv_pool(layer, x)`: stock_conv_pool or parity_conv_pool (models/ops.py chooses)."""

    def __init__(self, in_channels: int, out_channels: int, conv_pool=None):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.conv_pool = conv_pool or stock_conv_pool

    def __call__(self, x):
        return self.conv_pool(self, x)


def stock_conv_pool(layer: nn.Conv2d, x):
    """MLX's nn.Conv2d, then nn.MaxPool2d(2, 2)."""
    return nn.MaxPool2d(2, 2)(nn.Conv2d.__call__(layer, x))


def parity_conv_pool(layer: nn.Conv2d, x):
    """The same for MLX's CPU kernels: the convolution comes out grouped by pixel parity, by
    Winograd's algorithm (winograd_by_parity) from 16 input channels up, else unfolded
    (conv3x3_by_parity), so the pooling is a max over the first axis of contiguous blocks rather than
    over a strided view (the same function, gradient included: the cotangent split evenly among tied
    maxima). The bias comes after the max, on a quarter of the values: max(y) + b = max(y + b)
    exactly, rounding being monotonic; the gradient differs from the two MLX layers' only where two
    outputs differ but round equal once b is added (they split the cotangent there; this gives it to
    the larger). Odd sizes: the two MLX layers.
    """
    if x.shape[1] % 2 or x.shape[2] % 2:
        return stock_conv_pool(layer, x)
    convolution = winograd_by_parity if x.shape[-1] >= WINOGRAD_MIN_CHANNELS else conv3x3_by_parity
    return convolution(x, layer.weight)[0].max(axis=0) + layer.bias
