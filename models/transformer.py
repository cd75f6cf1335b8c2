import math

import mlx.core as mx
import mlx.nn as nn

from models.dense import Dense


@mx.custom_function
def softmax(scores):
    """softmax over the last axis, as mx.softmax computes it: p = exp(s - max s) * (1 / sum exp(s - max s)).

    Written out so that mx.compile fuses exp into a kernel it builds (with jit.py, for this CPU's vector
    units) instead of running MLX's scalar softmax kernel; same operations, same bits.
    """
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


class Attention(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, dim: int, heads: int, rope: bool):
        super().__init__()
        self.heads = heads
        self.qkv = Dense(dim, 3 * dim, bias=False)
        self.out = Dense(dim, dim, bias=False)
        self.rope = nn.RoPE(dim // heads) if rope else None

    def __call__(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, -1).transpose(2, 0, 3, 1, 4)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        attended = causal_attention(q, k, v, scale=1.0 / math.sqrt(dim // self.heads))
        return self.out(attended.transpose(0, 2, 1, 3).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, dropout: float, rope: bool):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, rope)
        self.mlp_norm = nn.LayerNorm(dim)
        # ReLU, not GELU: MLX's CPU erf cost ~28 ns an element, which made GELU slower than all
        # the matmuls of the block together (measured with MLX's own kernel flags).
        self.mlp = nn.Sequential(Dense(dim, 4 * dim), nn.ReLU(), Dense(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def __call__(self, x):
        x = x + self.dropout(self.attention(self.attention_norm(x)))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


@mx.custom_function
def loss_and_softmax(logits, targets):
    """Cross-entropy of each row of logits z against its target t, and the row's softmax p.

        loss = log sum_j exp(z_j) - z_t          d loss / d z_j = p_j - [j == t]

    p is returned for the vjp below, which reuses it (it is not differentiated itself).
    """
    top = logits.max(axis=-1, keepdims=True)
    # exp(logits - top) written apart from the target's shifted logit, so that mx.compile fuses the
    # subtraction and exp into one built kernel (a lone exp runs MLX's slower scalar one; jit.py).
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
    """Per-target cross-entropy, as nn.losses.cross_entropy(..., reduction="none").

    Differentiating nn.losses.cross_entropy takes exp of every logit twice, in logsumexp going
    forward and in the softmax of its vjp (MLX's logsumexp kernel is scalar, ~12 ns an element on
    this CPU): on a 10,261-word output (PTB before ClassSoftmax) that was over half a step.
    loss_and_softmax keeps the forward's softmax for its own vjp: one exp a logit, in a kernel
    mx.compile builds.
    """
    return loss_and_softmax(logits, targets)[0]


class ClassSoftmax(nn.Module):
    """Output layer p(w | h) = p(c | h) p(w | c, h), word w in class c = w // size (Goodman, 2001).

        log p(c | h)    = h.k_c - log sum_c' exp(h.k_c')
        log p(w | c, h) = h.e_w - log sum_{w' in c} exp(h.e_w')

    About sqrt(vocab) classes of sqrt(vocab) words: a token's loss takes about 2 sqrt(vocab) dot
    products and exps instead of vocab (PTB: 203 instead of 10,261). The word vectors e_w are the
    input embedding (tied); the class vectors k_c are this layer's. Give it ids sorted by frequency,
    so that the frequent words share the first classes and the rare ones the last.
    """

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.size = math.ceil(math.sqrt(vocab_size))
        self.vocab_size, classes = vocab_size, -(-vocab_size // self.size)
        self.classes = Dense(dim, classes, bias=False)
        self._real = (mx.arange(classes * self.size) < vocab_size).reshape(classes, self.size)  # the last class is padded

    def class_words(self, words):
        """The word vectors as (class, dim, size), the padding rows zero."""
        padding = mx.zeros((self._real.size - self.vocab_size, words.shape[1]), words.dtype)
        return mx.concatenate([words, padding]).reshape(*self._real.shape, -1).swapaxes(1, 2)

    def nll(self, h, targets, words):
        """-log p(t | h) for each target t; h (..., dim), words (vocab, dim)."""
        shape, h, targets = targets.shape, h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        # Sorted by class, the tokens of a class form one block: gather_mm's gradient is then a
        # segmented matmul instead of a scatter (50 ms -> 4 ms for PTB's 1,024 tokens).
        target_class = targets // self.size
        order = mx.argsort(target_class)
        h, target_class, position = h[order], target_class[order], targets[order] % self.size
        class_logits = self.classes(h)
        word_logits = mx.gather_mm(h[:, None], self.class_words(words), rhs_indices=target_class,
                                   sorted_indices=True)[:, 0]
        word_logits = mx.where(self._real[target_class], word_logits, -mx.inf)
        nll = (mx.logsumexp(class_logits, axis=-1) - mx.take_along_axis(class_logits, target_class[:, None], -1)[:, 0]
               + mx.logsumexp(word_logits, axis=-1) - mx.take_along_axis(word_logits, position[:, None], -1)[:, 0])
        return nll[mx.argsort(order)].reshape(shape)

    def __call__(self, h, words):
        """log p(w | h) for every word w: (..., vocab)."""
        class_log_probs = nn.log_softmax(self.classes(h), axis=-1)
        word_logits = mx.where(self._real, (h[..., None, None, :] @ self.class_words(words))[..., 0, :], -mx.inf)
        log_probs = class_log_probs[..., None] + nn.log_softmax(word_logits, axis=-1)
        return log_probs.reshape(*h.shape[:-1], -1)[..., :self.vocab_size]


class Transformer(nn.Module):
    """Decoder-only language model with tied input/output embeddings.

    positions="rope" rotates queries and keys (nn.RoPE); "learned" adds a position embedding.
    softmax="full" scores every word of the vocabulary; "class" factors the output through word
    classes (ClassSoftmax), for large vocabularies whose ids are sorted by frequency.
    """

    def __init__(self, vocab_size: int, context: int, layers: int = 4, dim: int = 128, heads: int = 4,
                 dropout: float = 0.0, positions: str = "rope", softmax: str = "full"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.embedding = nn.Embedding(vocab_size, dim)
        if positions == "learned":
            self.position_embedding = nn.Embedding(context, dim)
        self.blocks = [Block(dim, heads, dropout, rope=positions == "rope") for _ in range(layers)]
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.embedding.weight = 0.02 * mx.random.normal(self.embedding.weight.shape)
        if softmax == "class":
            self.class_softmax = ClassSoftmax(vocab_size, dim)

    def features(self, tokens):
        x = self.embedding(tokens)
        if "position_embedding" in self:
            x = x + self.position_embedding(mx.arange(tokens.shape[1]))
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def __call__(self, tokens):
        """Logits of the next token at every position (with softmax="class": its log-probabilities)."""
        h = self.features(tokens)
        if "class_softmax" in self:
            return self.class_softmax(h, self.embedding.weight)
        return self.embedding.as_linear(h)

    def nll(self, tokens, targets):
        """-log p(target | the tokens up to it), at every position: the loss, cheaper than from __call__."""
        h = self.features(tokens)
        if "class_softmax" in self:
            return self.class_softmax.nll(h, targets, self.embedding.weight)
        return softmax_cross_entropy(self.embedding.as_linear(h), targets)
