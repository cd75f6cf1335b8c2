"""Attention and cross-entropy written for MLX's CPU backend; the models use them on the CPU only.

Why they exist: on the CPU, mx.compile fuses elementwise operations into C++ kernels it builds
(with training/cpu_tuning.py, vectorised for this CPU), but a lone `exp`, a softmax or a logsumexp runs one
of MLX's prebuilt kernels, which compute exp one element at a time. These functions spell the
same arithmetic out so that every `exp` lands inside a fused kernel, and give it vjps that reuse
the forward's softmax instead of recomputing it:

    causal_attention        the operations of the CPU fallback of
                            mx.fast.scaled_dot_product_attention(..., mask="causal"): same bits
    softmax_cross_entropy   nn.losses.cross_entropy(..., reduction="none") with one exp a logit
                            instead of two: equal within float32 rounding

On a GPU, MLX's fused kernels (mx.fast.scaled_dot_product_attention, its softmax) are the fast
path, so the models call stock_attention and stock_cross_entropy there (models/ops.py chooses by
device; train.py --stock-ops forces them on the CPU too). Measurements: docs/performance.md.
"""

import mlx.core as mx
import mlx.nn as nn


@mx.custom_function
def softmax(scores):
    """softmax over the last axis, as mx.softmax computes it: p = exp(s - max s) * (1 / sum exp(s - max s))."""
    exps = mx.exp(scores - scores.max(axis=-1, keepdims=True))
    return exps * (1 / exps.sum(axis=-1, keepdims=True))


@softmax.vjp
def softmax_vjp(primals, cotangents, outputs):
    """d/ds: p * g - p * sum(p * g), as MLX's softmax differentiates."""
    p, g = outputs, cotangents  # one input, one output: arrays, not tuples
    pg = p * g
    return pg - p * pg.sum(axis=-1, keepdims=True)


def causal_attention(q, k, v, scale: float):
    """softmax(scale q k^T, future keys masked) v, in the operations of the CPU fallback of
    mx.fast.scaled_dot_product_attention(..., mask="causal"), with the softmax above (same bits)."""
    scores = (mx.array(scale, q.dtype) * q) @ k.swapaxes(-1, -2)
    length = q.shape[-2]
    causal = mx.arange(length)[:, None] >= mx.arange(length)[None]
    scores = mx.where(causal, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    return softmax(scores) @ v


def stock_attention(q, k, v, scale: float):
    """MLX's fused attention: what a GPU should run."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")


@mx.custom_function
def loss_and_softmax(logits, targets):
    """Cross-entropy of each row of logits z against its target t, and the row's softmax p.

        loss = log sum_j exp(z_j) - z_t          d loss / d z_j = p_j - [j == t]

    p is returned for the vjp below, which reuses it (it is not differentiated itself).
    """
    top = logits.max(axis=-1, keepdims=True)
    # exp(logits - top) apart from the target's shifted logit, so that the subtraction and exp fuse
    exps = mx.exp(logits - top)
    total = exps.sum(axis=-1, keepdims=True)
    loss = mx.log(total)[..., 0] - (mx.take_along_axis(logits, targets[..., None], axis=-1) - top)[..., 0]
    return loss, exps / total


@loss_and_softmax.vjp
def loss_and_softmax_vjp(primals, cotangents, outputs):
    logits, targets = primals
    onehot = mx.arange(logits.shape[-1]) == targets[..., None]
    return (outputs[1] - onehot) * cotangents[0][..., None], mx.zeros_like(targets)


def softmax_cross_entropy(logits, targets):
    """Per-target cross-entropy, as nn.losses.cross_entropy(..., reduction="none"), taking exp once a logit.

    Differentiating nn.losses.cross_entropy takes exp of every logit twice, in logsumexp going
    forward and in the softmax of its vjp; loss_and_softmax keeps the forward's softmax for its vjp.
    """
    return loss_and_softmax(logits, targets)[0]


def stock_cross_entropy(logits, targets):
    """MLX's own cross-entropy: what a GPU should run."""
    return nn.losses.cross_entropy(logits, targets, reduction="none")
