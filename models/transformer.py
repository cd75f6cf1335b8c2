import math

import mlx.core as mx
import mlx.nn as nn


class Attention(nn.Module):
    """Causal multi-head self-attention through mx.fast.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, rope: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.rope = nn.RoPE(dim // heads) if rope else None

    def __call__(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, -1).transpose(2, 0, 3, 1, 4)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        scale = 1.0 / math.sqrt(dim // self.heads)
        attended = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
        return self.out(attended.transpose(0, 2, 1, 3).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, dropout: float, rope: bool):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, rope)
        self.mlp_norm = nn.LayerNorm(dim)
        # ReLU, not GELU: on MLX's CPU backend erf/exp cost ~12-28 ns an element, which made
        # GELU slower than all the matmuls of the block together.
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def __call__(self, x):
        x = x + self.dropout(self.attention(self.attention_norm(x)))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """Decoder-only language model with tied input/output embeddings.

    positions="rope" rotates queries and keys (nn.RoPE); "learned" adds a position embedding.
    """

    def __init__(self, vocab_size: int, context: int, layers: int = 4, dim: int = 128, heads: int = 4,
                 dropout: float = 0.1, positions: str = "rope"):
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

    def __call__(self, tokens):
        x = self.embedding(tokens)
        if "position_embedding" in self:
            x = x + self.position_embedding(mx.arange(tokens.shape[1]))
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.embedding.as_linear(self.norm(x))
