"""Training-step throughput of the recipes: ours compiled vs eager vs PyTorch, in one run.

    python bench/train_step.py [--model mlp cnn lm ptb] [--steps 40]

Every variant trains the same architecture on the same random batch with Adagrad
(ours in MLX; torch.optim.Adagrad(fused=True) in PyTorch, when torch is installed),
at the recipes' defaults (MNIST 128 images; LM 128 wide, 16 windows of 64 tokens, with Tiny
Shakespeare's 4 blocks, 1,024 BPE tokens and a full softmax (lm), or PTB's 2 blocks, 10,261 words
and the class-factored softmax (ptb)), and with train.py's loss, models and compiled kernels
(jit.py). MLX runs with OpenBLAS on 1 thread (train.py's bit-reproducible default), on 2, and
on 1 in each of 2 streams that split the batch (train.py --streams 2, also bit-reproducible);
PyTorch on 1 thread and on 2. The ratios compare MLX on one thread with PyTorch on one, and each
of MLX's two ways to use 2 cores with PyTorch on 2 threads.
The variants take turns, a few steps at a time, so load on the machine hits all
alike; each cell is the median step time turned into samples (or tokens) per second.
"""

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import blas  # noqa: E402
import jit  # noqa: E402

BLAS = blas.load_optimized_blas()
KERNELS = jit.use_native_kernels()

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from adagrad import Adagrad  # noqa: E402
from models.cnn import CNN  # noqa: E402
from models.mlp import MLP  # noqa: E402
from models.transformer import Transformer  # noqa: E402
from train import CACHE_LIMIT, DEFAULTS, DROPOUT, LM_RECIPES, build_parser, cpu_streams, training_step  # noqa: E402

VOCAB = {"lm": 1024, "ptb": 10261}  # train.py --task lm's vocabularies: BPE default, PTB's words
SOFTMAX = {"lm": "full", "ptb": "class"}  # and its output layers and depths for them
LAYERS = {"lm": LM_RECIPES["tinyshakespeare"]["layers"], "ptb": LM_RECIPES["ptb"]["layers"]}
TRAIN_PARSER = build_parser()
CONTEXT, LM_DIM, LM_BATCH = TRAIN_PARSER.get_default("context"), TRAIN_PARSER.get_default("dim"), DEFAULTS["lm"]["batch_size"]


def make_mlx_model(name):
    if name in VOCAB:
        return Transformer(VOCAB[name], CONTEXT, LAYERS[name], LM_DIM, dropout=DROPOUT["transformer"], softmax=SOFTMAX[name])
    return {"mlp": MLP, "cnn": CNN}[name]()


def make_batch(name, rng):
    if name in VOCAB:
        tokens = rng.integers(0, VOCAB[name], (LM_BATCH, CONTEXT + 1)).astype(np.int32)
        return tokens[:, :-1], tokens[:, 1:]
    return rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 128).astype(np.int32)


def mlx_stepper(model_name, images, labels, compiled, threads, streams=1):
    mx.random.seed(0)
    model = make_mlx_model(model_name)
    optimizer = Adagrad(0.02)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state]
    x, y, scale = mx.array(images), mx.array(labels), mx.array(1 / labels.size, mx.float32)
    if model_name in VOCAB:  # train.py's losses: the transformer's own, MLX's cross-entropy for MNIST
        token_losses = lambda model, x, y: model.nll(x, y)  # noqa: E731
    else:
        token_losses = lambda model, x, y: nn.losses.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    step = training_step(model, optimizer, token_losses, lambda x: x, cpu_streams(streams))  # train.py's step
    if compiled:
        step = mx.compile(step, inputs=state, outputs=state)

    def run():
        blas.set_threads(threads)
        mx.eval(step(x, y, scale), state)

    return run


def torch_transformer(torch, tnn, vocab, softmax, layers):
    """The same decoder as models/transformer.py: pre-norm, RoPE, ReLU MLP, tied embeddings, full or
    class-factored softmax; its forward returns the mean loss."""

    def rope(x):  # x: (B, H, L, d); rotate the two halves, as nn.RoPE(traditional=False)
        half = x.shape[-1] // 2
        freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
        angles = torch.arange(x.shape[-2], dtype=torch.float32)[:, None] * freqs
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    class Block(tnn.Module):
        def __init__(self, dim, heads=4):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = tnn.LayerNorm(dim), tnn.LayerNorm(dim)
            self.qkv, self.out = tnn.Linear(dim, 3 * dim, bias=False), tnn.Linear(dim, dim, bias=False)
            self.mlp = tnn.Sequential(tnn.Linear(dim, 4 * dim), tnn.ReLU(), tnn.Linear(4 * dim, dim))
            self.drop = tnn.Dropout(DROPOUT["transformer"])

        def forward(self, x):
            b, length, dim = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = tnn.functional.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
            x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, length, dim)))
            return x + self.drop(self.mlp(self.norm2(x)))

    class LM(tnn.Module):
        def __init__(self, dim=LM_DIM):
            super().__init__()
            self.embedding = tnn.Embedding(vocab, dim)
            self.blocks = tnn.Sequential(*[Block(dim) for _ in range(layers)])
            self.norm, self.drop = tnn.LayerNorm(dim), tnn.Dropout(DROPOUT["transformer"])
            if softmax == "class":
                self.size = math.ceil(math.sqrt(vocab))
                self.classes = tnn.Linear(dim, -(-vocab // self.size), bias=False)

        def forward(self, tokens, targets):
            h = self.norm(self.blocks(self.drop(self.embedding(tokens)))).flatten(0, 1)
            targets = targets.flatten()
            if softmax == "full":
                return tnn.functional.cross_entropy(h @ self.embedding.weight.T, targets)
            words = self.embedding.weight  # padded to whole classes; the padding's logits are -inf
            padding = words.new_zeros(self.classes.out_features * self.size - vocab, words.shape[1])
            class_words = torch.cat([words, padding]).view(self.classes.out_features, self.size, -1)
            target_class, position = targets // self.size, targets % self.size
            word_logits = torch.einsum("nd,nsd->ns", h, class_words[target_class])
            real = torch.arange(self.classes.out_features * self.size).view(-1, self.size) < vocab
            word_logits = word_logits.masked_fill(~real[target_class], float("-inf"))
            return (tnn.functional.cross_entropy(self.classes(h), target_class)
                    + tnn.functional.cross_entropy(word_logits, position))

    return LM()


def torch_stepper(model_name, images, labels, threads):
    import torch
    from torch import nn as tnn

    torch.manual_seed(0)
    if model_name == "mlp":
        model = tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 512), tnn.ReLU(), tnn.Dropout(0.1),
                               tnn.Linear(512, 512), tnn.ReLU(), tnn.Dropout(0.1), tnn.Linear(512, 10))
    elif model_name in VOCAB:
        model = torch_transformer(torch, tnn, VOCAB[model_name], SOFTMAX[model_name], LAYERS[model_name])
    else:
        model = tnn.Sequential(tnn.Conv2d(1, 32, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
                               tnn.Conv2d(32, 64, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
                               tnn.Linear(7 * 7 * 64, 128), tnn.ReLU(), tnn.Dropout(0.5), tnn.Linear(128, 10))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.02, eps=1e-8, fused=True)
    if model_name in VOCAB:
        x, y = torch.from_numpy(images).long(), torch.from_numpy(labels).long()
    else:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # NCHW, as torch's conv wants
        y = torch.from_numpy(labels).long()

    def run():
        torch.set_num_threads(threads)
        optimizer.zero_grad(set_to_none=True)
        loss = model(x, y) if model_name in VOCAB else tnn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return run


def median_seconds(runs, steps):
    """Median seconds of each callable in `runs` over `steps` calls, after 5 warm-up calls (JIT
    builds, allocator caches). They take turns, 5 calls at a time, so load on the machine hits all alike."""
    for run in runs.values():
        for _ in range(5):
            run()
    times = {name: [] for name in runs}
    for _ in range(steps // 5):
        for name, run in runs.items():
            for _ in range(5):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mlp", "cnn", "lm", "ptb"], choices=["mlp", "cnn", "lm", "ptb"])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    mx.set_cache_limit(CACHE_LIMIT)  # as train.py does

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    rng = np.random.default_rng(0)
    print(f"BLAS: {BLAS}; mlx {mx.__version__}; compiled kernels: {KERNELS}; torch {torch_version or 'not installed'}")
    names = ["mlx compiled, 1 thread", "mlx compiled, 2 BLAS threads", "mlx compiled, 2 streams", "mlx eager, 1 thread"]
    names += ["torch, fused Adagrad, 1 thread", "torch, fused Adagrad, 2 threads"] if torch_version else []
    ratio_names = ["mlx / torch, 1 thread", "mlx 2 BLAS threads / torch 2 threads", "mlx 2 streams / torch 2 threads"]
    print("| model | unit | " + " | ".join(names + ratio_names) + " |")
    print("|---" * (len(names) + len(ratio_names) + 2) + "|")
    for model_name in args.model:
        images, labels = make_batch(model_name, rng)
        steppers = {names[0]: mlx_stepper(model_name, images, labels, True, 1),
                    names[1]: mlx_stepper(model_name, images, labels, True, 2),
                    names[2]: mlx_stepper(model_name, images, labels, True, 1, streams=2),
                    names[3]: mlx_stepper(model_name, images, labels, False, 1)}
        if torch_version:
            steppers[names[4]] = torch_stepper(model_name, images, labels, 1)
            steppers[names[5]] = torch_stepper(model_name, images, labels, 2)
        rate = {name: labels.size / seconds for name, seconds in median_seconds(steppers, args.steps).items()}
        pairs = [(names[0], names[4]), (names[1], names[5]), (names[2], names[5])]
        ratios = [f"{rate[a] / rate[b]:.2f}x" if torch_version else "-" for a, b in pairs]
        unit = "tokens/s" if model_name in VOCAB else "samples/s"
        print(f"| {model_name} | {unit} | " + " | ".join(f"{rate[n]:,.0f}" for n in names) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
