import mlx.core as mx
import mlx.nn as nn


def padded_rows(x):
    """x (B, H, W, C) with a zero border, as rows (B (H+2) (W+2) + 2 (W+2) + 2, C): one row a pixel,
    then zero rows enough for the largest shift below to stay inside."""
    batch, height, width, channels = x.shape
    rows = mx.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(-1, channels)
    return mx.pad(rows, ((0, 2 * (width + 2) + 2), (0, 0)))


def shifts(width):
    """(kernel row, kernel column, row offset) of the nine taps, rows being pixels of width + 2."""
    return [(dh, dw, dh * (width + 2) + dw) for dh in range(3) for dw in range(3)]


@mx.custom_function
def conv3x3(x, w):
    """mx.conv2d(x, w, padding=1) for a (O, 3, 3, C) kernel, as nine matmuls on shifted rows.

    With the padded image P flattened to rows P[r], r = (b (H+2) + i) (W+2) + j, the output at
    pixel (i, j) of image b is row r of

        Y = sum over taps (dh, dw) of  P[r + dh (W+2) + dw] @ w[:, dh, dw, :]^T

    Every shifted P is a contiguous slice, so the matmuls read it in place: MLX's CPU convolution
    copies a 9-times larger unfolded input first, and its input gradient is slower still
    (bench/step_costs.py). Rows past the image's width or height are computed and dropped.
    """
    batch, height, width, _ = x.shape
    rows, count = padded_rows(x), batch * (height + 2) * (width + 2)
    y = None
    for dh, dw, offset in shifts(width):
        tap = w[:, dh, dw, :].T
        y = rows[offset:offset + count] @ tap if y is None else mx.addmm(y, rows[offset:offset + count], tap)
    return y.reshape(batch, height + 2, width + 2, -1)[:, :height, :width]


@conv3x3.vjp
def conv3x3_vjp(primals, cotangent, output):
    """With G the cotangent as rows (zero at the dropped ones):

        dL/dw[:, dh, dw, :] = G^T @ P[shifted by dh (W+2) + dw]
        dL/dP[s]            = sum over taps of  G[s - dh (W+2) - dw] @ w[:, dh, dw, :]

    the second again nine matmuls on shifted slices, of G padded in front.
    """
    x, w = primals
    batch, height, width, channels = x.shape
    rows, count = padded_rows(x), batch * (height + 2) * (width + 2)
    g = mx.pad(cotangent, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(count, -1)
    front = 2 * (width + 2) + 2
    g_shifted = mx.pad(g, ((front, 0), (0, 0)))
    dw_taps, d_rows = [], None
    for dh, dw, offset in shifts(width):
        dw_taps.append(g.T @ rows[offset:offset + count])
        part, tap = g_shifted[front - offset:front - offset + count], w[:, dh, dw, :]
        d_rows = part @ tap if d_rows is None else mx.addmm(d_rows, part, tap)
    dx = d_rows.reshape(batch, height + 2, width + 2, channels)[:, 1:height + 1, 1:width + 1]
    return dx, mx.stack(dw_taps, axis=1).reshape(w.shape)


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(in, out, 3, padding=1), same parameters and initial draws, computed by conv3x3."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)

    def __call__(self, x):
        y = conv3x3(x, self.weight)
        return y + self.bias if "bias" in self else y
