"""Where a step's time goes on MLX's CPU backend: the parts beside the matmuls, in one run.

    python bench/step_costs.py [--steps 50] [--match CNN | --match LM]

MNIST MLP (batch 128): the compiled training step as train.py builds it, then with one part
removed at a time (augmentation shift, dropout, Adagrad replaced by plain SGD). The CNN's step
and its two conv + max-pool blocks (batch 128), each forward and backward, beside PyTorch's when it
is installed (in a process of its own, bench/torch_step.py) and beside MLX's nn.Conv2d +
nn.MaxPool2d (what models/conv.py's ConvPool replaces).
PTB output layer (1,024 words, one default batch; 128 wide, 10,261 words): the compiled forward
and backward of its matmul alone, with MLX's cross-entropy, with the full softmax's own (which
takes exp once a logit, not twice), and the class-factored softmax train.py uses for PTB
(models/transformer.py, ClassSoftmax). The Tiny Shakespeare LM's training step and its parts on
1,024 tokens (a layer norm, attention, MLP, a whole block, the output layer, the matmuls of one
block), each forward and backward, beside PyTorch's. An Adagrad update with the
gradient column-major (as MLX returns nn.Linear's) and row-major (models/ops.py::Dense's), and a sum
over the last axis in MLX and in NumPy.
Timed as bench/train_step.py times its variants: in turns, median.
"""

import argparse
import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from adagrad import Adagrad  # noqa: E402
from bench.train_step import (
    CONTEXT,
    LM_BATCH,
    LM_DIM,
    VOCAB,
    make_batch,
    median_seconds,
    mlx_stepper,  # noqa: E402
    start_torch,
    torch_runner,
    torch_stepper,
)
from data.mnist import random_shift  # noqa: E402
from models.cnn import CNN  # noqa: E402
from models.cpu_ops import softmax_cross_entropy  # noqa: E402
from models.mlp import MLP  # noqa: E402
from models.ops import CPU  # noqa: E402
from models.transformer import Block, ClassSoftmax  # noqa: E402
from training import cpu_tuning  # noqa: E402


def mlp_step(dropout, make_optimizer, shift):
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8))
    y = mx.array(rng.integers(0, 10, 128).astype(np.int32))
    mx.random.seed(0)
    model, optimizer = MLP(dropout=dropout), make_optimizer()
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state]

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(random_shift(x, shift)), y, reduction="mean")

    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    return lambda: mx.eval(step(x, y), state)


CNN_BLOCKS = [
    ("block1", "conv 1 -> 32 channels + max-pool, 28 x 28, weight gradients"),
    ("block2", "conv 32 -> 64 channels + max-pool, 14 x 14, weight and input gradients"),
]


def cnn_block(name, mlx_layers=False):
    """One conv + max-pool block of models/cnn.py at batch 128, NHWC: forward, then backward from a
    dense random cotangent into its parameters and, where training needs it, its input (the first
    block's is the images). mlx_layers: as nn.Conv2d then nn.MaxPool2d compute it, not ConvPool."""
    block = CNN(ops=CPU).convs[int(name[-1]) - 1]
    x = mx.random.normal((128, 28, 28, 1) if name == "block1" else (128, 14, 14, 32))
    layer = (lambda x: nn.MaxPool2d(2, 2)(nn.Conv2d.__call__(block, x))) if mlx_layers else block
    function, parameters = of_parameters(block, layer)
    if name == "block1":
        return forward_backward(partial(function, x), parameters)
    return forward_backward(function, [x, *parameters])


def of_parameters(module, call):
    """(function(x, *parameters) -> call(x) with the module's trainable parameters set to those given,
    the parameters now), so that a vjp differentiates the call in them."""
    names, values = zip(*tree_flatten(module.trainable_parameters()))

    def function(x, *values):
        module.update(tree_unflatten(list(zip(names, values))))
        return call(x)

    return function, list(values)


def forward_backward(function, primals):
    """A callable that runs `function` compiled on `primals`, forward and back from a dense random
    cotangent (as in training, where a `.sum()` would send a broadcast one)."""
    cotangent = mx.random.normal(function(*primals).shape)
    mx.eval(primals, cotangent)  # else the compiled function would draw them again at every call
    compiled = mx.compile(lambda *primals: mx.vjp(function, list(primals), [cotangent]))
    return lambda: mx.eval(compiled(*primals))


def output_layer(cross_entropy, words=LM_BATCH * CONTEXT, dim=LM_DIM, vocab=VOCAB["ptb"]):
    hidden, weight = mx.random.normal((words, dim)), 0.02 * mx.random.normal((vocab, dim))
    targets = mx.random.randint(0, vocab, (words,))

    def loss(weight, hidden):
        logits = hidden @ weight.T
        return logits.sum() if cross_entropy is None else cross_entropy(logits, targets).mean()

    grad = mx.compile(mx.value_and_grad(loss, argnums=(0, 1)))
    return lambda: mx.eval(grad(weight, hidden))


def class_output_layer(words=LM_BATCH * CONTEXT, dim=LM_DIM, vocab=VOCAB["ptb"]):
    layer, targets = ClassSoftmax(vocab, dim), mx.random.randint(0, vocab, (words,))
    # Held by the layer, so that one gradient covers them with its class vectors.
    layer.hidden, layer.words = mx.random.normal((words, dim)), 0.02 * mx.random.normal((vocab, dim))

    def loss():
        return layer.nll(layer.hidden, targets, layer.words).mean()

    grad = mx.compile(nn.value_and_grad(layer, loss), inputs=layer.state, outputs=layer.state)
    return lambda: mx.eval(grad())


def block_matmuls(tokens=LM_BATCH * CONTEXT, dim=LM_DIM):
    """The matmuls of one transformer block (qkv, attention output, the MLP's two), forward and backward."""
    shapes = [(dim, 3 * dim), (dim, dim), (dim, 4 * dim), (4 * dim, dim)]
    x, weights = mx.random.normal((tokens, dim)), [0.02 * mx.random.normal(shape) for shape in shapes]

    def loss(x, qkv, out, up, down):
        return (x @ qkv).sum() + (x @ out).sum() + ((x @ up) @ down).sum()

    grad = mx.compile(mx.grad(loss, argnums=(0, 1, 2, 3, 4)))
    return lambda: mx.eval(grad(x, *weights))


def adagrad_update(column_major, shape=(784, 512)):
    """One Adagrad update of a weight whose gradient is row-major, or column-major as nn.Linear's comes
    back from MLX (the transpose of x.T @ dy); models/ops.py::Dense stores weights so that it is row-major."""
    optimizer, box = Adagrad(0.01), {"params": {"w": mx.random.normal(shape)}}
    grads = {"w": mx.random.normal(shape[::-1]).T if column_major else mx.random.normal(shape)}
    optimizer.init(box["params"])
    mx.eval(box, grads, optimizer.state)
    apply = mx.compile(optimizer.apply_gradients, inputs=optimizer.state, outputs=optimizer.state)

    def step():
        box["params"] = apply(grads, box["params"])
        mx.eval(box["params"], optimizer.state)

    return step


def row_sum(framework, shape=(LM_BATCH * CONTEXT, 4 * LM_DIM)):
    """Sum over the last axis: MLX's CPU reduction adds one element at a time; NumPy's vectorises."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if framework == "numpy":

        def run():  # returns nothing: median_seconds takes a returned number as the call's own timing
            x.sum(axis=-1)

        return run
    x = mx.array(x)
    return lambda: mx.eval(x.sum(axis=-1))


LM_PARTS = [
    ("norm", "a layer norm"),
    ("attention", "attention: qkv, RoPE, causal softmax, projection"),
    ("mlp", "MLP 128 -> 512 -> 128"),
    ("block", "one whole block: the three above and a second norm"),
]


def lm_part(name):
    """One part of a block of the Tiny Shakespeare LM on 16 x 64 tokens, 128 wide: forward, then backward
    from a dense random cotangent into its parameters and its input."""
    block = Block(LM_DIM, 4, 0.0, rope=True, ops=CPU)
    part = {"norm": block.attention_norm, "attention": block.attention, "mlp": block.mlp, "block": block}[name]
    function, parameters = of_parameters(part, part)
    return forward_backward(function, [mx.random.normal((LM_BATCH, CONTEXT, LM_DIM)), *parameters])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--match", default="", help="only the cases whose name contains this text")
    args = parser.parse_args()
    tuning = cpu_tuning.enable()  # as train.py runs on a CPU, with one BLAS thread
    torch_process, torch_version = start_torch()

    def pytorch(name, **request):
        """{"<name>, PyTorch": the same case in PyTorch's process}, or {} without PyTorch."""
        if not torch_version:
            return {}
        if "model" in request:  # a training step, as bench/train_step.py's
            return {f"{name}, PyTorch": torch_stepper(torch_process, request["model"], *request["batch"], 1)}
        return {f"{name}, PyTorch": torch_runner(torch_process, name, threads=1, **request)}

    cnn_batch, lm_batch = make_batch("cnn", np.random.default_rng(0)), make_batch("lm", np.random.default_rng(0))
    cases = {
        "MLP step: shift 1, dropout 0.1, Adagrad (train.py)": mlp_step(0.1, lambda: Adagrad(0.01), 1),
        "MLP step: no shift": mlp_step(0.1, lambda: Adagrad(0.01), 0),
        "MLP step: no dropout": mlp_step(0.0, lambda: Adagrad(0.01), 1),
        "MLP step: SGD instead of Adagrad": mlp_step(0.1, lambda: optim.SGD(0.01), 1),
        "MLP step: none of the three": mlp_step(0.0, lambda: optim.SGD(0.01), 0),
        "CNN step (batch 128), as bench/train_step.py's cnn row": mlx_stepper(
            "cnn", *cnn_batch, compiled=True, threads=1
        ),
        **pytorch("CNN step", model="cnn", batch=cnn_batch),
    }
    for block, description in CNN_BLOCKS:
        cases[f"CNN {block} ({description}), forward + backward"] = cnn_block(block)
        cases.update(pytorch(f"CNN {block}", layer=block))
        cases[f"CNN {block} as nn.Conv2d + nn.MaxPool2d (MLX's vjps), forward + backward"] = cnn_block(
            block, mlx_layers=True
        )
    cases.update(
        {
            "PTB output layer: matmuls, forward + backward": output_layer(None),
            "PTB output layer: matmuls + nn.losses.cross_entropy": output_layer(
                partial(nn.losses.cross_entropy, reduction="none")
            ),
            "PTB output layer: matmuls + the full softmax's cross-entropy (one exp a logit)": output_layer(
                softmax_cross_entropy
            ),
            "PTB output layer: class-factored softmax (train.py's for PTB)": class_output_layer(),
            "LM step (Tiny Shakespeare's 4 blocks, 128 wide, 1,024 tokens), bench/train_step.py's lm row": mlx_stepper(
                "lm", *lm_batch, compiled=True, threads=1
            ),
            **pytorch("LM step", model="lm", batch=lm_batch),
        }
    )
    for part, description in LM_PARTS:
        cases[f"LM {part} ({description}), forward + backward"] = lm_part(part)
        cases.update(pytorch(f"LM {part}", layer=f"lm {part}"))
    cases.update(
        {
            "LM output (1,024 words), full softmax, forward + backward": output_layer(
                softmax_cross_entropy, vocab=VOCAB["lm"]
            ),
            **pytorch("LM output", layer="lm output"),
            "LM matmuls of one block (qkv, projection, MLP; 1,024 tokens), forward + backward": block_matmuls(),
            **pytorch("LM matmuls", layer="lm matmuls"),
            "Adagrad update of a 784 x 512 weight, gradient column-major (nn.Linear's)": adagrad_update(True),
            "Adagrad update of a 784 x 512 weight, gradient row-major (models/ops.py::Dense)": adagrad_update(False),
            "Sum over the last axis of 1,024 x 512, MLX": row_sum("mlx"),
            "Sum over the last axis of 1,024 x 512, NumPy": row_sum("numpy"),
        }
    )
    cases = {name: case for name, case in cases.items() if args.match in name}
    seconds = median_seconds(cases, args.steps)
    print(
        f"BLAS: {tuning['blas']}, 1 thread; mlx {mx.__version__}; compiled kernels: {tuning['kernels']}; "
        f"torch {torch_version or 'not installed (no PyTorch rows)'}, 1 thread"
    )
    print("| case | median ms |")
    print("|---|---|")
    for name, t in seconds.items():
        print(f"| {name} | {1e3 * t:.2f} |")


if __name__ == "__main__":
    main()
