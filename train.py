"""Train an MNIST classifier or a small transformer language model with Adagrad in MLX.

    python train.py --optimizer adagrad                      # MLP on MNIST
    python train.py --model cnn                              # small CNN on MNIST
    python train.py --dataset fashion-mnist
    python train.py --task lm --dataset tinyshakespeare      # transformer LM (also ptb, wikitext-2, PATH)
    python train.py --checkpoint-dir ckpt --steps 500 && python train.py --checkpoint-dir ckpt --resume
    python train.py --task lm --streams 2                    # both cores of one machine, bit-reproducible
    mlx.launch -n 2 --backend ring -- python train.py        # data-parallel on 2 processes

The training step is compiled once over the full state (model, optimizer, RNG), its kernels built
for this CPU (jit.py; MLX_ADAGRAD_NATIVE_KERNELS=0 keeps MLX's own build flags), with OpenBLAS when
installed (blas.py). Data come from --data-dir (default $MLX_ADAGRAD_DATA, else ~/.cache/mlx-adagrad).
"""

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from functools import partial, reduce
from pathlib import Path
from types import SimpleNamespace

import blas
import jit

BLAS = blas.load_optimized_blas()  # must run before mlx.core is imported
KERNELS = jit.use_native_kernels()  # before the first compiled call
# mx.eval queues a graph's operations breadth-first up to this width (MLX's default 20), deeper ones
# depth-first, and stops queuing while ~10 tasks are pending. At 20, --streams 2 gets one half's
# backward queued behind the other's, and a stream waits; at 1000 both are queued side by side
# (README, "Both cores"). Read at the first evaluation; it changes the order, not the results.
os.environ.setdefault("MLX_BFS_MAX_WIDTH", "1000")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402
from tqdm import tqdm  # noqa: E402

import checkpoint  # noqa: E402
from adagrad import Adagrad  # noqa: E402
from adagrad_da import AdagradDA  # noqa: E402
from data import DataError, default_data_dir, mnist, text  # noqa: E402
from models.cnn import CNN  # noqa: E402
from models.mlp import MLP  # noqa: E402
from models.transformer import Transformer  # noqa: E402

OPTIMIZERS = ["adagrad", "mlx-adagrad", "adagrad-da", "sgd", "adam", "adamw"]
# Chosen by sweeps on the default model of each task (README, "Choosing the defaults").
DEFAULT_LR = {
    "mlp": {"adagrad": 0.01, "mlx-adagrad": 0.01, "adagrad-da": 0.01, "sgd": 0.05, "adam": 1e-3, "adamw": 1e-3},
    "cnn": {"adagrad": 0.03, "mlx-adagrad": 0.03, "adagrad-da": 0.01, "sgd": 0.05, "adam": 1e-3, "adamw": 1e-3},
    "transformer": {"adagrad": 0.02, "mlx-adagrad": 0.02, "adagrad-da": 0.02, "sgd": 0.03, "adam": 5e-4, "adamw": 5e-4},
}
DEFAULTS = {  # per task: dataset, model, batch size, epochs, schedule
    "mnist": dict(dataset="mnist", model="mlp", batch_size=128, schedule="cosine"),
    "lm": dict(dataset="tinyshakespeare", model="transformer", batch_size=16, schedule="cosine"),
}
MNIST_EPOCHS = {"mlp": 24, "cnn": 20}
AUGMENT_SHIFT = {"mlp": 1, "cnn": 2}
DROPOUT = {"mlp": 0.1, "cnn": 0.5, "transformer": 0.0}
# Passes over the text and transformer blocks: 6-8 minutes each on a 2-core CPU (README, "Choosing the defaults").
LM_RECIPES = {"tinyshakespeare": dict(epochs=8, layers=4), "ptb": dict(epochs=8, layers=2),
              "other": dict(epochs=1, layers=4)}
# MLX keeps freed buffers up to this for reuse; its default here, 32 MiB, returns the LM's logits to the OS each step.
CACHE_LIMIT = 1 << 30


def recipe_help(key):
    return ", ".join(f"{name} {recipe[key]}" for name, recipe in LM_RECIPES.items() if name != "other") + \
        f", other text {LM_RECIPES['other'][key]}"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["mnist", "lm"], default="mnist", help="what to train (default: mnist)")
    p.add_argument("--dataset", help="mnist: mnist (default) | fashion-mnist; lm: tinyshakespeare (default) | ptb | "
                                     "wikitext-2 | PATH to a .txt file or a folder of them")
    p.add_argument("--model", choices=["mlp", "cnn", "transformer"], help="mnist: mlp 784-512-512-10 (default) | cnn; "
                                                                          "lm: transformer")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adagrad",
                   help="adagrad = ours (adagrad.py); mlx-adagrad = mlx.optimizers.Adagrad; adagrad-da = dual "
                        "averaging (adagrad_da.py) (default: adagrad)")
    p.add_argument("--lr", type=float, help="learning rate; defaults: " + "; ".join(
        f"{model}: " + ", ".join(f"{k} {v:g}" for k, v in lrs.items()) for model, lrs in DEFAULT_LR.items()))
    p.add_argument("--eps", type=float, help="epsilon of adagrad/adam/adamw (default: the optimizer's, 1e-8)")
    p.add_argument("--initial-accumulator-value", type=float, default=0.0, help="adagrad: v starts here (default 0)")
    p.add_argument("--lr-decay", type=float, default=0.0, help="adagrad: lr / (1 + (t-1) * lr_decay) (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="adagrad/sgd: L2 added to g; adamw: decoupled (default 0)")
    p.add_argument("--l1", type=float, default=0.0, help="adagrad: proximal L1; adagrad-da: L1 of dual averaging "
                   "(default 0). Both give exact zeros")
    p.add_argument("--l2", type=float, default=0.0, help="adagrad / adagrad-da: proximal L2 (default 0)")
    p.add_argument("--rowwise-embeddings", action="store_true",
                   help="adagrad: one accumulator per row of each nn.Embedding table (lm)")
    p.add_argument("--schedule", choices=["constant", "cosine"], help="learning-rate schedule (default: cosine)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default 0)")
    p.add_argument("--batch-size", type=int, help="default: mnist 128, lm 16")
    p.add_argument("--epochs", type=int, help=f"default: mnist {MNIST_EPOCHS}; lm " + recipe_help("epochs") + " "
                                              "(an lm epoch is about one pass over the training tokens)")
    p.add_argument("--steps", type=int, help="stop after this many steps in all (the schedule still spans --epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", type=float,
                   help=f"dropout probability (default: {', '.join(f'{k} {v}' for k, v in DROPOUT.items())})")
    p.add_argument("--no-compile", action="store_true", help="run the step eagerly (bit-identical, slower)")
    p.add_argument("--blas-threads", type=int, default=1, help="OpenBLAS threads (default 1: bit-reproducible; "
                   "2 trains the LM ~1.25x faster but runs may differ in the last bits)")
    p.add_argument("--streams", type=int, default=1, help="split each batch over N MLX CPU streams, each a thread of "
                   "its own (default 1; 2 trains the LMs 1.3-1.8x faster on 2 cores and stays bit-reproducible, but "
                   "sums the gradient in another order than 1: other last bits; train.py sets MLX_BFS_MAX_WIDTH=1000 "
                   "unless set, so that MLX queues the parts side by side)")
    p.add_argument("--data-dir", type=Path, default=None, help="default: $MLX_ADAGRAD_DATA, else ~/.cache/mlx-adagrad")
    p.add_argument("--log-file", type=Path, help="write JSONL: a config line, then step and evaluation lines")
    p.add_argument("--log-every", type=int, default=10, help="log the mean training loss every N steps (default 10)")
    p.add_argument("--checkpoint-dir", type=Path, help="save checkpoints here (every --checkpoint-every steps and at the end)")
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--reproduce", type=Path, metavar="LOG", help="rerun the run recorded in LOG (a --log-file) for "
                   "--reproduce-steps steps and compare every logged value; exits 1 on a mismatch")
    p.add_argument("--reproduce-steps", type=int, default=REPRODUCE_STEPS,
                   help=f"default {REPRODUCE_STEPS}: on another platform or BLAS, rounding grows over the steps")
    mnist_options = p.add_argument_group("mnist")
    mnist_options.add_argument("--augment-shift", type=int, help="shift training images by up to N pixels, 0: off "
                               f"(default: {', '.join(f'{k} {v}' for k, v in AUGMENT_SHIFT.items())})")
    lm = p.add_argument_group("lm")
    lm.add_argument("--layers", type=int, help="transformer blocks (default: " + recipe_help("layers") + ")")
    lm.add_argument("--dim", type=int, default=128, help="model width (default 128)")
    lm.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    lm.add_argument("--context", type=int, default=64, help="tokens per training window (default 64)")
    lm.add_argument("--positions", choices=["rope", "learned"], default="rope")
    lm.add_argument("--tokenizer", choices=["bpe", "unigram", "word"],
                    help="SentencePiece model (default: word for ptb, a word-level corpus with a closed vocabulary; "
                         "else bpe)")
    lm.add_argument("--vocab-size", type=int, help="tokenizer vocabulary (default: bpe/unigram 1024; word: every "
                                                   "word of the training text)")
    lm.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "mlx-adagrad-tokenizers",
                    help="where trained tokenizers are kept")
    lm.add_argument("--softmax", choices=["full", "class"],
                    help="output layer: full scores every word; class factors p(word) = p(class) p(word | class) "
                         "over ~sqrt(vocab) classes, ~50x fewer exps at PTB's 10k words (default: class with "
                         "--tokenizer word, whose vocabularies are large; else full)")
    lm.add_argument("--sample", type=int, default=0, help="print N tokens sampled from the model at the end")
    lm.add_argument("--temperature", type=float, default=0.8)
    return p


def fail(message):
    rank = mx.distributed.init().rank() if mx.distributed.is_available() else 0
    print(f"train.py: error{f' (rank {rank})' if rank else ''}: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args):
    for key, value in DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs is None and args.task == "mnist":
        args.epochs = MNIST_EPOCHS[args.model]
    for key, value in LM_RECIPES.get(args.dataset, LM_RECIPES["other"]).items():  # mnist too: its unused lm options
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dropout is None:
        args.dropout = DROPOUT[args.model]
    if args.augment_shift is None:
        args.augment_shift = AUGMENT_SHIFT.get(args.model, 0)
    args.lr = DEFAULT_LR[args.model][args.optimizer] if args.lr is None else args.lr
    if args.task == "lm":
        args.tokenizer = args.tokenizer or ("word" if args.dataset == "ptb" else "bpe")
        if args.vocab_size is None and args.tokenizer != "word":
            args.vocab_size = 1024
        args.softmax = args.softmax or ("class" if args.tokenizer == "word" else "full")
    args.data_dir = args.data_dir or default_data_dir()
    if args.task == "mnist" and args.dataset not in mnist.SHA256:
        fail(f"--dataset {args.dataset} is not an image dataset: choose {', '.join(mnist.SHA256)} (or --task lm)")
    if (args.task == "lm") != (args.model == "transformer"):
        fail(f"--model {args.model} does not fit --task {args.task}: mnist takes mlp or cnn, lm takes transformer")
    positive = ["lr", "batch_size", "epochs", "log_every", "checkpoint_every", "layers", "dim", "heads", "context",
                "temperature", "blas_threads", "streams"]
    positive += [name for name in ("steps", "eps") if getattr(args, name) is not None]
    for name in positive:
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ["initial_accumulator_value", "lr_decay", "weight_decay", "warmup", "augment_shift", "sample", "l1", "l2"]:
        if not getattr(args, name) >= 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ["initial_accumulator_value", "lr_decay", "rowwise_embeddings"]:
        if getattr(args, name) and args.optimizer != "adagrad":
            fail(f"--{name.replace('_', '-')} is an option of --optimizer adagrad, not {args.optimizer}")
    for name in ["l1", "l2"]:
        if getattr(args, name) and args.optimizer not in ("adagrad", "adagrad-da"):
            fail(f"--{name} is an option of --optimizer adagrad or adagrad-da, not {args.optimizer}")
    if args.rowwise_embeddings and args.task != "lm":
        fail("--rowwise-embeddings needs a model with embedding tables: use it with --task lm")
    if args.weight_decay and args.optimizer in ("mlx-adagrad", "adagrad-da", "adam"):
        fail(f"{args.optimizer} has no weight decay: use --optimizer adagrad or adamw")
    if not 0 <= args.dropout < 1:
        fail(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.dim % args.heads:
        fail(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
    if args.resume and not args.checkpoint_dir:
        fail("--resume needs --checkpoint-dir, the folder of the run to continue")


def learning_rate(args, total_steps):
    if args.schedule == "constant" and not args.warmup:
        return args.lr
    main = (optim.cosine_decay(args.lr, max(total_steps - args.warmup, 1)) if args.schedule == "cosine"
            else lambda step: mx.array(args.lr, mx.float32))
    if not args.warmup:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, args.lr, args.warmup), main], [args.warmup])


def embedding_tables(model):
    """A predicate for Adagrad(rowwise=...): true for the weights of the model's nn.Embedding layers."""
    paths = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Embedding)}
    return lambda path, parameter: path in paths


def make_optimizer(args, lr, model):
    eps = {} if args.eps is None else {"eps": args.eps}
    if args.optimizer == "adagrad":
        return Adagrad(lr, initial_accumulator_value=args.initial_accumulator_value, lr_decay=args.lr_decay,
                       weight_decay=args.weight_decay, l1=args.l1, l2=args.l2,
                       rowwise=embedding_tables(model) if args.rowwise_embeddings else None, **eps)
    if args.optimizer == "adagrad-da":
        return AdagradDA(lr, l1=args.l1, l2=args.l2, **eps)
    if args.optimizer == "mlx-adagrad":
        return optim.Adagrad(lr, **eps)
    if args.optimizer == "sgd":
        return optim.SGD(lr, momentum=0.9, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return optim.Adam(lr, **eps)
    return optim.AdamW(lr, weight_decay=args.weight_decay, **eps)


def batch_loss(model, inputs, targets, scale, token_losses):
    """Summed cross-entropy times `scale` = 1 / (targets in the global batch): the batch mean on one process."""
    return token_losses(model, inputs, targets).sum() * scale


def shard(batch, rank, world):
    """This process's rows of a global batch, and its loss scale.

    Each of the `world` processes takes a disjoint slice of the rows. Its loss is its summed
    cross-entropy times world / n, n the targets in the whole batch, so the mean over processes
    of the shard gradients (nn.average_gradients) is the gradient of the global batch mean,
    even when the last batch does not split evenly.
    """
    inputs, targets = (np.array_split(a, world)[rank] for a in batch)
    return mx.array(inputs), mx.array(targets), mx.array(world / batch[1].size, mx.float32)


def cpu_streams(count):
    """`count` MLX CPU streams, each run by a thread of its own (one: the default stream)."""
    return [mx.default_stream(mx.cpu)] if count == 1 else [mx.new_stream(mx.cpu) for _ in range(count)]


def training_step(model, optimizer, token_losses, augment, streams, world=1):
    """step(inputs, targets, scale) -> loss: one optimizer update on a batch, as train.py trains.

    The batch's rows are split over `streams`, whose threads take their parts forward and back at
    the same time, each with its one-thread BLAS. A part's loss is its summed cross-entropy times
    `scale` (see shard), so the parts' losses and gradients add up to the batch's; under
    mlx.launch the processes then average theirs.
    """
    loss_and_grad = nn.value_and_grad(model, batch_loss)

    def step(inputs, targets, scale):
        parts = []
        for stream, part_inputs, part_targets in zip(streams, split_rows(inputs, len(streams)),
                                                     split_rows(targets, len(streams))):
            with mx.stream(stream):
                parts.append(loss_and_grad(model, augment(part_inputs), part_targets, scale, token_losses))
        loss = reduce(mx.add, [part_loss for part_loss, _ in parts])
        grads = reduce(partial(tree_map, mx.add), [part_grads for _, part_grads in parts])
        if world > 1:  # every process applies the same averaged gradient, so weights and state stay equal
            grads, loss = nn.average_gradients(grads), mx.distributed.all_sum(loss) / world
        optimizer.update(model, grads)
        return loss

    return step


def split_rows(array, parts):
    """`parts` consecutive blocks of rows, as np.array_split cuts them, but none empty (fewer parts
    when there are fewer rows; one part: the array itself)."""
    parts = min(parts, array.shape[0])
    if parts == 1:
        return [array]
    sizes = [len(block) for block in np.array_split(np.arange(array.shape[0]), parts)]
    return mx.split(array, np.cumsum(sizes)[:-1].tolist())


# ---------------------------------------------------------------------------------------
# Tasks: each gives a model, training batches, a train-time augmentation, its loss per target
# (token_losses(model, inputs, targets)) and an evaluation.


def setup_mnist(args):
    data = mnist.load(args.dataset, args.data_dir)
    model = MLP(dropout=args.dropout) if args.model == "mlp" else CNN(dropout=args.dropout)

    def evaluate(model, final=False):
        total_loss, correct, n = 0.0, 0, len(data["test_labels"])
        for i in range(0, n, 1000):
            x, y = mx.array(data["test_images"][i:i + 1000]), mx.array(data["test_labels"][i:i + 1000])
            logits = model(x)
            loss, hits = nn.losses.cross_entropy(logits, y, reduction="sum"), (logits.argmax(axis=1) == y).sum()
            total_loss, correct = total_loss + loss.item(), correct + hits.item()
        metrics = {"test_loss": total_loss / n, "test_acc": correct / n}
        return metrics, f"test loss {metrics['test_loss']:.4f}, test accuracy {100 * metrics['test_acc']:.2f}%"

    return SimpleNamespace(
        model=model, evaluate=evaluate, unit="samples", per_batch=lambda batch: len(batch[1]),
        batches=mnist.Batches(data["train_images"], data["train_labels"], args.batch_size, args.seed),
        augment=partial(mnist.random_shift, max_shift=args.augment_shift),
        token_losses=lambda model, x, y: nn.losses.cross_entropy(model(x), y, reduction="none"))


def setup_lm(args):
    splits = text.load_splits(args.dataset, args.data_dir)
    sp = text.tokenizer(splits["train"], args.vocab_size, args.tokenizer, args.cache_dir)
    tokens = {split: text.encode(sp, t) for split, t in splits.items()}
    sp_ids = np.arange(sp.vocab_size())  # sp_ids[the model's token id] = SentencePiece's id
    if args.softmax == "class":  # its classes are runs of ids: renumber the vocabulary by training frequency
        sp_ids = text.by_frequency(tokens["train"], sp.vocab_size())
    model_ids = np.argsort(sp_ids).astype(np.int32)  # the inverse: model_ids[SentencePiece's id]
    tokens = {split: model_ids[t] for split, t in tokens.items()}
    if len(tokens["valid"]) < args.context + 1:
        raise DataError(f"--context {args.context} is longer than the validation split ({len(tokens['valid']) - 1} "
                        f"tokens): use a smaller --context")
    model = Transformer(sp.vocab_size(), args.context, args.layers, args.dim, args.heads,
                        args.dropout, args.positions, args.softmax)

    def evaluate(model, final=False):
        metrics = {}
        for split in ["valid"] + (["test"] if final and "test" in splits else []):
            nll = 0.0
            for x, y, scored in text.eval_windows(tokens[split], args.context):
                nll += np.array(model.nll(mx.array(x), mx.array(y)), np.float64)[scored].sum()  # float64: 10^5 tokens
            prefix = "val" if split == "valid" else "test"
            metrics[f"{prefix}_loss"] = nll / (len(tokens[split]) - 1)
            metrics[f"{prefix}_nats_per_char"] = nll / len(splits[split])
            if args.dataset == "ptb":
                metrics[f"{prefix}_word_ppl"] = math.exp(nll / text.word_count(splits[split]))
        summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        return metrics, summary

    def sample(model, count, temperature):
        model.eval()
        sampled, key = [int(model_ids[sp.bos_id()])], mx.random.key(args.seed)
        for _ in range(count):
            logits = model(mx.array([sampled[-args.context:]]))[0, -1]
            key, subkey = mx.random.split(key)
            sampled.append(mx.random.categorical(logits / temperature, key=subkey).item())
        return text.decode(sp, sp_ids[sampled[1:]].tolist())

    return SimpleNamespace(
        model=model, evaluate=evaluate, unit="tokens", per_batch=lambda batch: batch[1].size, sample=sample,
        batches=text.Windows(tokens["train"], args.batch_size, args.context, args.seed), augment=lambda x: x,
        token_losses=lambda model, x, y: model.nll(x, y))


# ---------------------------------------------------------------------------------------
# Logging and the training loop


class JsonlLog:
    """One JSON object per line; a no-op without a path."""

    def __init__(self, path, header=None):
        self.file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a" if header is None else "w")
            if header is not None:
                self.write(header)

    def write(self, record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


def run_header(args, command, world):
    return {
        "command": command,
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "world_size": world},
        "mlx": mx.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "machine": platform.machine(), "blas": f"{BLAS}, {blas.threads()} threads",
        "kernels": KERNELS,
    }


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.reproduce:
        sys.exit(reproduce(args.reproduce, args.reproduce_steps, args.data_dir))
    check_args(args)
    return train(args, " ".join(["python", "train.py", *(sys.argv[1:] if argv is None else argv)]))


def train(args, command):
    """Train as `args` says; return the model and optimizer. Under mlx.launch, data-parallel."""
    group = mx.distributed.init()  # a group of one unless started by mlx.launch
    rank, world = group.rank(), group.size()
    say = print if rank == 0 else (lambda *_, **__: None)
    blas.set_threads(args.blas_threads)
    say(f"BLAS: {BLAS}, {blas.threads()} threads" + (f"; data-parallel on {world} processes" if world > 1 else ""))
    say(f"Compiled kernels: {KERNELS}")
    mx.set_cache_limit(CACHE_LIMIT)
    if args.batch_size < world * args.streams:
        fail(f"--batch-size {args.batch_size} is smaller than the {world} process(es) x {args.streams} stream(s): "
             "each needs a share of every batch")

    mx.random.seed(args.seed)
    try:
        task = setup_mnist(args) if args.task == "mnist" else setup_lm(args)
    except DataError as e:
        fail(str(e))
    model, batches = task.model, task.batches
    try:
        optimizer = make_optimizer(args, learning_rate(args, args.epochs * batches.per_epoch), model)
    except ValueError as e:
        fail(str(e))
    optimizer.init(model.trainable_parameters())
    state_bytes = sum(v.nbytes for _, v in tree_flatten(optimizer.state))
    say(f"{args.optimizer}: optimizer state {state_bytes / 2**20:.2f} MiB for "
        f"{sum(v.size for _, v in tree_flatten(model.trainable_parameters())):,} parameters")
    header = run_header(args, command, world)
    config = header["config"]
    if rank > 0:  # same initial weights on every process, but its own dropout and augmentation draws
        mx.random.seed(args.seed + rank)

    step, epoch, start_batch = 0, 0, 0
    if args.resume:
        try:
            saved = checkpoint.load(args.checkpoint_dir, model, optimizer, config, rank)
        except checkpoint.CheckpointError as e:
            fail(str(e))
        step, epoch, start_batch = saved["step"], saved["epoch"], saved["batch"]
        say(f"resumed from {args.checkpoint_dir} at step {step} (epoch {epoch + 1}, batch {start_batch})")

    # The compiled step captures these objects: build it only after init and any resume.
    state = [model.state, optimizer.state, mx.random.state]

    train_step = training_step(model, optimizer, task.token_losses, task.augment, cpu_streams(args.streams), world)
    if not args.no_compile:
        train_step = partial(mx.compile, inputs=state, outputs=state)(train_step)

    log = JsonlLog(args.log_file if rank == 0 else None, None if args.resume else header)

    def save_checkpoint(epoch, batch):
        if batch == batches.per_epoch:  # store the end of an epoch as the start of the next
            epoch, batch = epoch + 1, 0
        checkpoint.save(args.checkpoint_dir, model, optimizer, {"step": step, "epoch": epoch, "batch": batch, "config": config},
                        group)

    def evaluate(final=False):
        model.eval()
        metrics, summary = task.evaluate(model, final)
        model.train()
        return metrics, summary

    model.train()
    last_saved, loss, start_time = step, float("nan"), time.perf_counter()
    while epoch < args.epochs and (args.steps is None or step < args.steps):
        bar = tqdm(batches.epoch(epoch, start_batch), total=batches.per_epoch, initial=start_batch,
                   desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, mininterval=0.5, disable=rank > 0)
        window, seen, tic = [], 0, time.perf_counter()
        for batch in bar:
            loss = train_step(*shard(batch, rank, world))
            mx.eval(state, loss)
            loss = loss.item()
            step, start_batch, seen = step + 1, start_batch + 1, seen + task.per_batch(batch)
            if not math.isfinite(loss):
                saved = args.checkpoint_dir and (args.checkpoint_dir / "checkpoint.safetensors").exists()
                where = f"; the last good checkpoint (step {last_saved}) is in {args.checkpoint_dir}" if saved else ""
                fail(f"loss is {loss} at step {step}: training diverged, try a lower --lr{where}")
            window.append(loss)
            if step % args.log_every == 0:
                rate = seen / (time.perf_counter() - tic)
                log.write({"step": step, "epoch": epoch + 1, "loss": sum(window) / len(window),
                           "lr": optimizer.learning_rate.item(), f"{task.unit}_per_s": rate})
                bar.set_postfix(loss=f"{window[-1]:.3f}", **{f"{task.unit}_per_s": f"{rate:.0f}"}, refresh=False)
                window = []
            if args.checkpoint_dir and step % args.checkpoint_every == 0:
                save_checkpoint(epoch, start_batch)
                last_saved = step
            if step == args.steps:
                break
        bar.close()
        seconds, trained_epoch = time.perf_counter() - tic, epoch + 1
        if start_batch == batches.per_epoch:
            epoch, start_batch = epoch + 1, 0
        if rank == 0:  # the others go on; they wait for it at the next step's gradient average
            metrics, summary = evaluate(final=epoch == args.epochs or step == args.steps)
            log.write({"step": step, "epoch": trained_epoch, **metrics, "elapsed_s": time.perf_counter() - start_time})
            say(f"epoch {trained_epoch}: step {step}, train loss {loss:.4f}, {summary}, {seen / seconds:.0f} {task.unit}/s")
    if args.checkpoint_dir and last_saved != step:
        save_checkpoint(epoch, start_batch)
    if args.l1:
        weights = [v for _, v in tree_flatten(model.trainable_parameters())]
        zeros = sum((v == 0).sum().item() for v in weights)
        say(f"L1: {zeros:,} of {sum(v.size for v in weights):,} weights are exactly zero "
            f"({100 * zeros / sum(v.size for v in weights):.1f}%)")
    if args.task == "lm" and args.sample and rank == 0:
        print(task.sample(model, args.sample, args.temperature))
    return model, optimizer


# ---------------------------------------------------------------------------------------
# Reproducing a recorded run

# Another platform, BLAS or MLX rounds matmuls differently, and Adagrad magnifies it: its first
# updates move each weight by about lr * sign(g), so a gradient near zero that rounds to the other
# sign moves its weight by 2 lr. Between two OpenBLAS kernel sets the recorded Adagrad MLP runs
# drifted by up to 1e-5 (relative) at step 10, 4e-4 at step 20 and 7e-3 at step 30 (AdamW and SGD:
# 1e-8); another seed, lr +-5-10% or dropout 0.12 for 0.1 moved step 10 by 2e-2 or more.
CROSS_PLATFORM_RTOL = 3e-3
REPRODUCE_STEPS = 20


def reproduce(recorded_log: Path, steps: int, data_dir) -> int:
    """Rerun the first `steps` steps of a recorded run and compare its logged losses and learning rates."""
    try:
        lines = [json.loads(line) for line in Path(recorded_log).read_text().splitlines()]
        header = lines[0]
        config = {k: v for k, v in header["config"].items() if k != "world_size"}
    except (OSError, ValueError, KeyError, IndexError) as e:
        fail(f"{recorded_log} is not a log written by train.py --log-file ({type(e).__name__}: {e})")
    recorded = {r["step"]: r for r in lines[1:] if "loss" in r and r["step"] <= steps}
    if not recorded:
        fail(f"{recorded_log} logs no training loss within the first {steps} steps: raise --reproduce-steps")
    group = mx.distributed.init()
    recorded_world = header["config"].get("world_size", 1)
    if recorded_world != group.size():
        fail(f"{recorded_log} was recorded on {recorded_world} process(es), this is {group.size()}: "
             f"run mlx.launch -n {recorded_world} -- python train.py --reproduce {recorded_log}")
    args = build_parser().parse_args([])  # options newer than the log keep their defaults
    vars(args).update(config)
    paths = {"data_dir": data_dir or default_data_dir(), "cache_dir": Path(config["cache_dir"]) if config.get("cache_dir") else None}
    blas.set_threads(config.get("blas_threads", 1))
    same_machine = all(header.get(k) == v for k, v in {"platform": platform.platform(), "mlx": mx.__version__,
                                                       "blas": f"{BLAS}, {blas.threads()} threads"}.items())
    with tempfile.TemporaryDirectory() as tmp:
        vars(args).update(paths, steps=steps, log_file=Path(tmp) / "rerun.jsonl", checkpoint_dir=None, resume=False,
                          sample=0, reproduce=None)
        if args.cache_dir is None or not args.cache_dir.parent.exists():
            args.cache_dir = build_parser().get_default("cache_dir")
        check_args(args)  # fills what an older log left to the defaults of its time (e.g. dropout: None)
        print(f"reproducing {recorded_log}: {header['command']} (first {steps} steps)")
        train(args, f"python train.py --reproduce {recorded_log}")
        if group.rank() > 0:  # rank 0 wrote the log and compares
            return 0
        rerun = {r["step"]: r for r in map(json.loads, (Path(tmp) / "rerun.jsonl").read_text().splitlines()[1:])
                 if "loss" in r}
    mismatches = []
    for step, want in recorded.items():
        got = rerun.get(step, {})
        for key in ("loss", "lr"):
            if key not in got:
                mismatches.append(f"step {step}: no {key} logged")
            elif (got[key] != want[key]) if same_machine else not math.isclose(got[key], want[key], rel_tol=CROSS_PLATFORM_RTOL):
                mismatches.append(f"step {step} {key}: {got[key]!r} != recorded {want[key]!r}")
    how = "bit-exact (same platform, BLAS and MLX)" if same_machine else f"within rtol {CROSS_PLATFORM_RTOL} (other platform/BLAS/MLX)"
    if mismatches:
        print(f"MISMATCH: {len(mismatches)} of {2 * len(recorded)} values differ {how}; first: {mismatches[0]}")
        return 1
    print(f"REPRODUCED: {2 * len(recorded)} logged values over {steps} steps match, {how}")
    return 0


if __name__ == "__main__":
    main()
