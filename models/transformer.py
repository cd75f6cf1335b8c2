import math

import mlx.core as mx
import mlx.nn as nn

from models.ops import STOCK, Dense, Ops


class Attention(nn.Module):
    """Causal multi-head self-attention, computed by `attend` (an Ops.attention)."""

    def __init__(self, dim: int, heads: int, rope: bool, attend=STOCK.attention):
        super().__init__()
        self.heads = heads
        self.attend = attend
        self.qkv = Dense(dim, 3 * dim, bias=False)
        self.out = Dense(dim, dim, bias=False)
        self.rope = nn.RoPE(dim // heads) if rope else None

    def __call__(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, -1).transpose(2, 0, 3, 1, 4)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        attended = self.attend(q, k, v, scale=1.0 / math.sqrt(dim // self.heads))
        return self.out(attended.transpose(0, 2, 1, 3).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, dropout: float, rope: bool, ops: Ops = STOCK):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, rope, ops.attention)
        self.mlp_norm = nn.LayerNorm(dim)
        # ReLU, not GELU: MLX's CPU erf is slow (docs/performance.md)
        self.mlp = nn.Sequential(Dense(dim, 4 * dim), nn.ReLU(), Dense(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def __call__(self, x):
        x = x + self.dropout(self.attention(self.attention_norm(x)))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


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
        self._real = (mx.arange(classes * self.size) < vocab_size).reshape(
            classes, self.size
        )  # the last class is padded

    def class_words(self, words):
        """The word vectors as (class, dim, size), the padding rows zero."""
        padding = mx.zeros((self._real.size - self.vocab_size, words.shape[1]), words.dtype)
        return mx.concatenate([words, padding]).reshape(*self._real.shape, -1).swapaxes(1, 2)

    def nll(self, h, targets, words):
        """-log p(t | h) for each target t; h (..., dim), words (vocab, dim)."""
        shape, h, targets = targets.shape, h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        # Sorted by class, the tokens of a class form one block: gather_mm's gradient is then a
        # segmented matmul instead of a scatter.
        target_class = targets // self.size
        order = mx.argsort(target_class)
        h, target_class, position = h[order], target_class[order], targets[order] % self.size
        class_logits = self.classes(h)
        word_logits = mx.gather_mm(h[:, None], self.class_words(words), rhs_indices=target_class, sorted_indices=True)[
            :, 0
        ]
        word_logits = mx.where(self._real[target_class], word_logits, -mx.inf)
        nll = (
            mx.logsumexp(class_logits, axis=-1)
            - mx.take_along_axis(class_logits, target_class[:, None], -1)[:, 0]
            + mx.logsumexp(word_logits, axis=-1)
            - mx.take_along_axis(word_logits, position[:, None], -1)[:, 0]
        )
        return nll[mx.argsort(order)].reshape(shape)

    def __call__(self, h, words):
        """log p(w | h) for every word w: (..., vocab)."""
        class_log_probs = nn.log_softmax(self.classes(h), axis=-1)
        word_logits = mx.where(self._real, (h[..., None, None, :] @ self.class_words(words))[..., 0, :], -mx.inf)
        log_probs = class_log_probs[..., None] + nn.log_softmax(word_logits, axis=-1)
        return log_probs.reshape(*h.shape[:-1], -1)[..., : self.vocab_size]


class Transformer(nn.Module):
    """Decoder-only language model, its input and output embeddings tied unless tied=False.

    positions="rope" rotates queries and keys (nn.RoPE); "learned" adds a position embedding.
    softmax="full" scores every word of the vocabulary; "class" factors the output through word
    classes (ClassSoftmax), for large vocabularies whose ids are sorted by frequency.
    `ops` (models/ops.py) computes attention and the full softmax's cross-entropy: MLX's fused
    ones (STOCK) or those written for its CPU kernels (CPU). Same parameters either way.
    hash_buckets > 0 adds to each token's input vector a row of a table of that many rows, chosen
    by hashing the token with the one before it (hashed bigram features): a large table of which
    a batch uses few rows. tied=False gives the output a (vocab, dim) table of its own.
    The model runs from token ids or from its input tables' rows, looked up for input_ids(tokens).
    """

    def __init__(
        self,
        vocab_size: int,
        context: int,
        layers: int = 4,
        dim: int = 128,
        heads: int = 4,
        dropout: float = 0.0,
        positions: str = "rope",
        softmax: str = "full",
        ops: Ops = STOCK,
        tied: bool = True,
        hash_buckets: int = 0,
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        if positions == "learned":
            self.position_embedding = nn.Embedding(context, dim)
        self.blocks = [Block(dim, heads, dropout, positions == "rope", ops) for _ in range(layers)]
        self.cross_entropy = ops.cross_entropy
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.embedding.weight = 0.02 * mx.random.normal(self.embedding.weight.shape)
        if softmax == "class":
            self.class_softmax = ClassSoftmax(vocab_size, dim)
        if not tied:
            self.output = nn.Embedding(vocab_size, dim)
            self.output.weight = 0.02 * mx.random.normal(self.output.weight.shape)
        if hash_buckets:
            self.bigrams = nn.Embedding(hash_buckets, dim)
            self.bigrams.weight = mx.zeros(self.bigrams.weight.shape)  # starts as the model without it

    def input_tables(self) -> list:
        """The paths of the input embedding tables: the keys of input_ids."""
        return ["embedding.weight"] + (["bigrams.weight"] if "bigrams" in self else [])

    def input_ids(self, tokens) -> dict:
        """The rows each input table looks up for `tokens` (batch, length), by the table's path: the
        tokens themselves, and for the bigram table a hash of each token and the one before it (0
        before the first)."""
        ids = {"embedding.weight": tokens}
        if "bigrams" in self:
            previous = mx.concatenate([mx.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)
            pair = previous.astype(mx.uint32) * 1000003 + tokens.astype(mx.uint32)  # wraps around 2^32
            ids["bigrams.weight"] = (pair % self.bigrams.weight.shape[0]).astype(mx.int32)
        return ids

    def lookup(self, tokens) -> tuple:
        """The input tables' rows for `tokens`, one array per table, in the order of input_ids."""
        tables = [self.embedding] + ([self.bigrams] if "bigrams" in self else [])
        return tuple(table(ids) for table, ids in zip(tables, self.input_ids(tokens).values()))

    def words(self):
        """The output layer's word vectors, (vocab, dim)."""
        return (self.output if "output" in self else self.embedding).weight

    def features(self, tokens):
        """tokens: (batch, length) ids, or the tuple of rows lookup(ids) gives."""
        rows = tokens if isinstance(tokens, tuple) else self.lookup(tokens)
        x = sum(rows[1:], rows[0])
        if "position_embedding" in self:
            x = x + self.position_embedding(mx.arange(x.shape[1]))
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def __call__(self, tokens):
        """Logits of the next token at every position (with softmax="class": its log-probabilities)."""
        h = self.features(tokens)
        if "class_softmax" in self:
            return self.class_softmax(h, self.words())
        return h @ self.words().T

    def nll(self, tokens, targets):
        """-log p(target | the tokens up to it), at every position: the loss, cheaper than from __call__."""
        h = self.features(tokens)
        if "class_softmax" in self:
            return self.class_softmax.nll(h, targets, self.words())
        return self.cross_entropy(h @ self.words().T, targets)
