"""PyTorch's side of bench/train_step.py, in a process of its own.

    python bench/torch_step.py     (started by bench/train_step.py; speaks JSON lines on stdin/stdout)

PyTorch's wheels bring their own BLAS (MKL on x86-64). In bench/train_step.py's process, which
loads OpenBLAS globally for MLX (cpu_tuning.py), PyTorch's matmuls would bind to that OpenBLAS instead,
so they run here, with what PyTorch uses when a user runs it. Requests, one JSON object a line:

    {"op": "build", "key": K, "model": "mlp" | "cnn" | "lm", "batch": path of an .npz (x, y),
     "threads": T, and for "lm": "vocab", "softmax" ("full" | "class"), "layers", "dim", "dropout"}
    {"op": "build", "key": K, "layer": "block1" | "block2" | "lm norm" | "lm attention" | "lm mlp"
     | "lm block" | "lm output" | "lm matmuls", "threads": T}
                                 one of the CNN's conv + max-pool blocks or one part of the LM alone
                                 (bench/step_costs.py)
    {"op": "run", "key": K}      one training step, or the layer's forward and backward;
                                 answers {"seconds": its duration}

The first line out is {"torch": "version (BLAS)"}, or {"error": ...} when torch cannot be imported.
"""

import json
import math
import sys
import time

import numpy as np


def transformer(torch, tnn, vocab, softmax, layers, dim, dropout):
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
        def __init__(self, heads=4):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = tnn.LayerNorm(dim), tnn.LayerNorm(dim)
            self.qkv, self.out = tnn.Linear(dim, 3 * dim, bias=False), tnn.Linear(dim, dim, bias=False)
            self.mlp = tnn.Sequential(tnn.Linear(dim, 4 * dim), tnn.ReLU(), tnn.Linear(4 * dim, dim))
            self.drop = tnn.Dropout(dropout)

        def attention(self, x):
            b, length, _ = x.shape
            q, k, v = self.qkv(x).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = tnn.functional.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
            return self.out(a.transpose(1, 2).reshape(b, length, dim))

        def forward(self, x):
            x = x + self.drop(self.attention(self.norm1(x)))
            return x + self.drop(self.mlp(self.norm2(x)))

    class LM(tnn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = tnn.Embedding(vocab, dim)
            self.blocks = tnn.Sequential(*[Block() for _ in range(layers)])
            self.norm, self.drop = tnn.LayerNorm(dim), tnn.Dropout(dropout)
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
            return tnn.functional.cross_entropy(self.classes(h), target_class) + tnn.functional.cross_entropy(
                word_logits, position
            )

    return LM()


def stepper(torch, request):
    """One training step of the request's model with torch.optim.Adagrad(fused=True), as a callable."""
    from torch import nn as tnn

    torch.manual_seed(0)
    with np.load(request["batch"], allow_pickle=False) as batch:
        images, labels = batch["x"], batch["y"]
    if request["model"] == "mlp":
        model = tnn.Sequential(
            tnn.Flatten(),
            tnn.Linear(784, 512),
            tnn.ReLU(),
            tnn.Dropout(0.1),
            tnn.Linear(512, 512),
            tnn.ReLU(),
            tnn.Dropout(0.1),
            tnn.Linear(512, 10),
        )
    elif request["model"] == "cnn":
        model = tnn.Sequential(
            tnn.Conv2d(1, 32, 3, padding=1),
            tnn.ReLU(),
            tnn.MaxPool2d(2),
            tnn.Conv2d(32, 64, 3, padding=1),
            tnn.ReLU(),
            tnn.MaxPool2d(2),
            tnn.Flatten(),
            tnn.Linear(7 * 7 * 64, 128),
            tnn.ReLU(),
            tnn.Dropout(0.5),
            tnn.Linear(128, 10),
        )
    else:
        model = transformer(
            torch, tnn, request["vocab"], request["softmax"], request["layers"], request["dim"], request["dropout"]
        )
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.02, eps=1e-8, fused=True)
    if request["model"] == "lm":
        x, y = torch.from_numpy(images).long(), torch.from_numpy(labels).long()
    else:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # NCHW, as torch's conv wants
        y = torch.from_numpy(labels).long()

    def run():
        torch.set_num_threads(request["threads"])
        optimizer.zero_grad(set_to_none=True)
        loss = model(x, y) if request["model"] == "lm" else tnn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return run


def layer_stepper(torch, request):
    """One conv + max-pool block of the CNN at batch 128, NCHW, or one part of the Tiny Shakespeare LM
    on 16 x 64 tokens, 128 wide: forward, then backward from a dense random cotangent into its
    parameters and, where training needs it, its input (the CNN's first block's is the images)."""
    from torch import nn as tnn

    torch.manual_seed(0)
    name, lm = request["layer"], transformer(torch, tnn, vocab=1024, softmax="full", layers=1, dim=128, dropout=0.0)
    block, targets = lm.blocks[0], torch.randint(0, 1024, (16 * 64,))
    weights = [
        (0.02 * torch.randn(shape)).requires_grad_() for shape in [(128, 384), (128, 128), (128, 512), (512, 128)]
    ]
    shape, layer = {
        "block1": ((128, 1, 28, 28), tnn.Sequential(tnn.Conv2d(1, 32, 3, padding=1), tnn.MaxPool2d(2))),
        "block2": ((128, 32, 14, 14), tnn.Sequential(tnn.Conv2d(32, 64, 3, padding=1), tnn.MaxPool2d(2))),
        "lm norm": ((16, 64, 128), block.norm1),
        "lm attention": ((16, 64, 128), block.attention),
        "lm mlp": ((16, 64, 128), block.mlp),
        "lm block": ((16, 64, 128), block),
        "lm output": ((16 * 64, 128), lambda h: tnn.functional.cross_entropy(h @ lm.embedding.weight.T, targets)),
        "lm matmuls": (
            (16 * 64, 128),
            lambda x: (x @ weights[0]).sum() + (x @ weights[1]).sum() + ((x @ weights[2]) @ weights[3]).sum(),
        ),
    }[name]
    x = torch.randn(shape, requires_grad=name != "block1")
    cotangent = torch.randn(layer(x).shape)

    def run():
        torch.set_num_threads(request["threads"])
        lm.zero_grad(set_to_none=True)
        if isinstance(layer, tnn.Module):
            layer.zero_grad(set_to_none=True)
        for tensor in [x, *weights]:
            tensor.grad = None
        layer(x).backward(cotangent)

    return run


def main():
    try:
        import torch
    except ImportError as error:
        print(json.dumps({"error": str(error)}), flush=True)
        return
    blas = "MKL" if torch.backends.mkl.is_available() else "its own BLAS"
    print(json.dumps({"torch": f"{torch.__version__} ({blas})"}), flush=True)
    steppers = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "build":
            steppers[request["key"]] = (layer_stepper if "layer" in request else stepper)(torch, request)
            print(json.dumps({"ok": True}), flush=True)
        else:
            start = time.perf_counter()
            steppers[request["key"]]()
            print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main()
