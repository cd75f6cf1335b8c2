"""The operations a model computes with, chosen in one place: MLX's own (STOCK, right on every
device) or the formulations written for MLX's CPU kernels (CPU: models/cpu_ops.py and
models/conv.py; same parameters, same results within float32 rounding, faster on a CPU)."""

from collections.abc import Callable
from dataclasses import dataclass

from models.conv import parity_conv_pool, stock_conv_pool
from models.cpu_ops import causal_attention, softmax_cross_entropy, stock_attention, stock_cross_entropy


@dataclass(frozen=True)
class Ops:
    name: str
    attention: Callable  # (q, k, v, scale) -> causal attention
    cross_entropy: Callable  # (logits, targets) -> each target's loss
    conv_pool: Callable  # (ConvPool layer, images) -> max-pooled 3x3 convolution


STOCK = Ops("MLX stock ops", stock_attention, stock_cross_entropy, stock_conv_pool)
CPU = Ops("CPU formulations", causal_attention, softmax_cross_entropy, parity_conv_pool)


def for_device(device: str, stock: bool = False) -> Ops:
    """CPU for a step on the CPU, unless `stock` (train.py --stock-ops); STOCK elsewhere."""
    return CPU if device == "cpu" and not stock else STOCK
