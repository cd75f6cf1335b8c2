"""Train an MNIST classifier or a small transformer language model with Adagrad in MLX.

    python train.py --optimizer adagrad                      # MLP on MNIST
    python train.py --model cnn                              # small CNN on MNIST
    python train.py --dataset fashion-mnist
    python train.py --task lm --dataset tinyshakespeare      # transformer LM (also ptb, wikitext-2, PATH)
    python train.py --checkpoint-dir ckpt --steps 500 && python train.py --checkpoint-dir ckpt --resume
    python train.py --reproduce curves/mnist_mlp_adagrad.jsonl
    mlx.launch -n 2 --backend ring -- python train.py        # data-parallel on 2 processes

The step is compiled once over the full state (model, optimizer, RNG) and runs on MLX's default
device (--device). On a Linux CPU, cpu_tuning.py adds OpenBLAS and kernels built for this CPU
(--cpu-tuning off: MLX as it comes). Data come from --data-dir (default $MLX_ADAGRAD_DATA, else
~/.cache/mlx-adagrad). Recipes, options and results: README.md and docs/.
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

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm

import checkpoint
import cpu_tuning
import reproduce
import tasks
from adagrad import Adagrad, sparse_value_and_grad
from adagrad_da import AdagradDA
from data import DataError, default_data_dir, mnist
from interrupts import Interrupts
from runlog import JsonlLog, LogError

# ---------------------------------------------------------------------------------------
# Options. Those whose default depends on the recipe are None in the parser and filled from
# RECIPES: the task's entry, then the model's, then the dataset's (or "other" text's). Why these
# values: docs/defaults.md.

RECIPES = {
    "task": {
        "mnist": dict(dataset="mnist", model="mlp", batch_size=128),
        "lm": dict(dataset="tinyshakespeare", model="transformer", batch_size=16),
    },
    "model": {
        "mlp": dict(epochs=24, augment_shift=1, dropout=0.1),
        "cnn": dict(epochs=20, augment_shift=2, dropout=0.5),
        "transformer": dict(augment_shift=0, dropout=0.0),
    },
    "dataset": {
        "tinyshakespeare": dict(epochs=8, layers=4),
        "ptb": dict(epochs=8, layers=2),
        "other": dict(epochs=1, layers=4),
    },
}
LEARNING_RATES = {
    "mlp": {"adagrad": 0.01, "mlx-adagrad": 0.01, "adagrad-da": 0.01, "sgd": 0.05, "adam": 1e-3, "adamw": 1e-3},
    "cnn": {"adagrad": 0.03, "mlx-adagrad": 0.03, "adagrad-da": 0.01, "sgd": 0.05, "adam": 1e-3, "adamw": 1e-3},
    "transformer": {"adagrad": 0.02, "mlx-adagrad": 0.02, "adagrad-da": 0.02, "sgd": 0.03, "adam": 5e-4, "adamw": 5e-4},
}
OPTIMIZERS = list(LEARNING_RATES["mlp"])
# A run stops when its loss is not finite or exceeds this many times its first step's.
DIVERGED = 1000
# Options that say how to run, not what is trained: a checkpoint resumes under other values of these.
HOW_TO_RUN = set(
    "steps data_dir cache_dir log_file log_every checkpoint_dir checkpoint_every resume overwrite reproduce "
    "reproduce_steps no_compile blas_threads streams sample temperature device stock_ops cpu_tuning verify_data".split()
)


def recipe_defaults(option):
    """'mlp 24, cnn 20, ...': where RECIPES sets `option`, for --help."""
    return ", ".join(
        f"{name}: {values[option]}" for table in RECIPES.values() for name, values in table.items() if option in values
    )


# fmt: off
def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lrs = "; ".join(f"{name}: " + ", ".join(f"{k} {v:g}" for k, v in lr.items()) for name, lr in LEARNING_RATES.items())
    p.add_argument("--task", choices=["mnist", "lm"], default="mnist", help="what to train (default: mnist)")
    p.add_argument("--dataset", help="mnist | fashion-mnist; tinyshakespeare | ptb | wikitext-2 | PATH of a .txt "
                   f"file or a folder of them (default: {recipe_defaults('dataset')})")
    p.add_argument("--model", choices=list(RECIPES["model"]), help=f"default: {recipe_defaults('model')}")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adagrad", help="adagrad: adagrad.py; mlx-adagrad: "
                   "mlx.optimizers.Adagrad; adagrad-da: adagrad_da.py; sgd: momentum 0.9 (default: adagrad)")
    p.add_argument("--lr", type=float, help=f"learning rate; a run stops when its loss is not finite or over "
                   f"{DIVERGED}x its first step's (default: {lrs})")
    p.add_argument("--eps", type=float, help="epsilon of adagrad, adam, adamw (default: the optimizer's, 1e-8)")
    p.add_argument("--initial-accumulator-value", type=float, default=0.0, help="adagrad: v starts here (default 0)")
    p.add_argument("--lr-decay", type=float, default=0.0, help="adagrad: lr / (1 + (t-1) lr_decay) (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="adagrad, sgd: L2 on g; adamw: decoupled (0)")
    p.add_argument("--l1", type=float, default=0.0, help="adagrad: proximal L1; adagrad-da: its L1 (default 0)")
    p.add_argument("--l2", type=float, default=0.0, help="adagrad, adagrad-da: proximal L2 (default 0)")
    p.add_argument("--rowwise-embeddings", action="store_true", help="adagrad: one accumulator per embedding row")
    p.add_argument("--sparse-embeddings", action="store_true", help="adagrad, lm: update only the input embedding "
                   "rows a batch looked up (adagrad.SparseEmbedding); implies --untied")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="cosine", help="over --epochs (cosine)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default 0)")
    p.add_argument("--batch-size", type=int, help=f"default: {recipe_defaults('batch_size')}")
    p.add_argument("--epochs", type=int, help=f"default: {recipe_defaults('epochs')}; an lm epoch is ~1 pass")
    p.add_argument("--steps", type=int, help="stop after this many steps in all (the schedule spans --epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", type=float, help=f"dropout probability (default: {recipe_defaults('dropout')})")
    p.add_argument("--data-dir", type=Path, help="default: $MLX_ADAGRAD_DATA, else ~/.cache/mlx-adagrad")
    p.add_argument("--log-file", type=Path, help="JSONL: a header line, then step and evaluation lines")
    p.add_argument("--log-every", type=int, default=10, help="log the mean training loss every N steps (10)")
    p.add_argument("--checkpoint-dir", type=Path, help="save checkpoints here, every --checkpoint-every steps and last")
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--overwrite", action="store_true", help="start over in a --checkpoint-dir that holds a "
                   "checkpoint, or on an existing --log-file (otherwise refused)")
    p.add_argument("--verify-data", choices=["on", "off"], default="on", help="check local data files against "
                   "the originals' sha256 (off: train on your own files of the same names)")
    p.add_argument("--reproduce", type=Path, metavar="LOG", help="rerun the run LOG records for --reproduce-steps "
                   "steps and compare every logged value; exit 1 on a mismatch")
    p.add_argument("--reproduce-steps", type=int, default=reproduce.REPRODUCE_STEPS)
    device = p.add_argument_group("device")
    device.add_argument("--device", choices=["cpu", "gpu"], help="where the step runs (default: MLX's default)")
    device.add_argument("--no-compile", action="store_true", help="run the step eagerly (same bits, slower)")
    device.add_argument("--stock-ops", action="store_true", help="MLX's own attention, cross-entropy, conv and "
                        "pooling on the CPU too, as on a GPU (not models/cpu_ops.py, models/conv.py, the "
                        "complex64 scatter of --sparse-embeddings)")
    device.add_argument("--cpu-tuning", choices=["on", "off"], default="on" if cpu_tuning.default_on() else "off",
                        help="cpu_tuning.py on a Linux CPU (default: on, unless MLX_ADAGRAD_CPU_TUNING=off)")
    device.add_argument("--blas-threads", type=int, default=1, help="OpenBLAS threads (default 1; more vary the "
                        "last bits from run to run)")
    device.add_argument("--streams", type=int, default=1, help="CPU only: split each batch over N threads "
                        "(default 1; reproducible, other last bits than 1)")
    mnist_options = p.add_argument_group("mnist")
    mnist_options.add_argument("--augment-shift", type=int, help="shift training images by up to N pixels "
                               f"(default: {recipe_defaults('augment_shift')})")
    lm = p.add_argument_group("lm")
    lm.add_argument("--layers", type=int, help=f"transformer blocks (default: {recipe_defaults('layers')})")
    lm.add_argument("--dim", type=int, default=128, help="model width (default 128)")
    lm.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    lm.add_argument("--context", type=int, default=64, help="tokens per training window (default 64)")
    lm.add_argument("--positions", choices=["rope", "learned"], default="rope")
    lm.add_argument("--untied", action="store_true", help="give the output layer its own word vectors")
    lm.add_argument("--hash-buckets", type=int, default=0, help="add a hashed-bigram input table of N rows (0: none)")
    lm.add_argument("--tokenizer", choices=["bpe", "unigram", "word"], help="default: word for ptb, else bpe")
    lm.add_argument("--vocab-size", type=int, help="default: bpe, unigram 1024; word: every training word")
    lm.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "mlx-adagrad-tokenizers",
                    help="where trained tokenizers are kept")
    lm.add_argument("--softmax", choices=["full", "class"], help="class: p(word) = p(class) p(word | class) "
                    "(default: class with --tokenizer word, else full)")
    lm.add_argument("--sample", type=int, default=0, help="print N tokens sampled from the model at the end")
    lm.add_argument("--temperature", type=float, default=0.8)
    return p
# fmt: on


def fail(message):
    rank = mx.distributed.init().rank() if mx.distributed.is_available() else 0
    print(f"train.py: error{f' (rank {rank})' if rank else ''}: {message}", file=sys.stderr)
    sys.exit(2)


def with_defaults(args):
    """`args` with every option left unset filled from RECIPES and LEARNING_RATES, then checked."""
    values = dict(vars(args))
    for kind in ("task", "model", "dataset"):
        table = RECIPES[kind]
        for option, value in table.get(values[kind], table.get("other", {})).items():
            if values[option] is None:
                values[option] = value
    args = argparse.Namespace(**values)
    if args.lr is None:
        args.lr = LEARNING_RATES[args.model][args.optimizer]
    if args.task == "lm":
        args.tokenizer = args.tokenizer or ("word" if args.dataset == "ptb" else "bpe")
        if args.vocab_size is None and args.tokenizer != "word":
            args.vocab_size = 1024
        args.softmax = args.softmax or ("class" if args.tokenizer == "word" else "full")
    args.untied = args.untied or args.sparse_embeddings  # a frozen sparse table cannot be tied to the output
    args.data_dir = args.data_dir or default_data_dir()
    check(args)
    return args


def check(args):
    """One line and exit 2 for options that cannot work together."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.task == "mnist" and args.dataset not in mnist.SHA256:
        fail(f"--dataset {args.dataset} is not an image dataset: choose {', '.join(mnist.SHA256)} (or --task lm)")
    if (args.task == "lm") != (args.model == "transformer"):
        fail(f"--model {args.model} does not fit --task {args.task}: mnist takes mlp or cnn, lm takes transformer")
    positive = "lr batch_size epochs log_every checkpoint_every layers dim heads context temperature".split()
    positive += ["blas_threads", "streams"]
    positive += [name for name in ("steps", "eps") if getattr(args, name) is not None]
    for name in positive:
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for (
        name
    ) in "initial_accumulator_value lr_decay weight_decay warmup augment_shift sample l1 l2 hash_buckets".split():
        if not getattr(args, name) >= 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ["initial_accumulator_value", "lr_decay", "rowwise_embeddings", "sparse_embeddings"]:
        if getattr(args, name) and args.optimizer != "adagrad":
            fail(f"--{name.replace('_', '-')} is an option of --optimizer adagrad, not {args.optimizer}")
    for name in ["l1", "l2"]:
        if getattr(args, name) and args.optimizer not in ("adagrad", "adagrad-da"):
            fail(f"--{name} is an option of --optimizer adagrad or adagrad-da, not {args.optimizer}")
    for name in ["rowwise_embeddings", "sparse_embeddings", "hash_buckets"]:
        if getattr(args, name) and args.task != "lm":
            fail(f"--{name.replace('_', '-')} needs a model with embedding tables: use it with --task lm")
    if args.weight_decay and args.optimizer in ("mlx-adagrad", "adagrad-da", "adam"):
        fail(f"{args.optimizer} has no weight decay: use --optimizer adagrad or adamw")
    if not 0 <= args.dropout < 1:
        fail(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.dim % args.heads:
        fail(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
    if args.resume and not args.checkpoint_dir:
        fail("--resume needs --checkpoint-dir, the folder of the run to continue")


def choose_device(requested):
    """'cpu' or 'gpu': `requested`, else MLX's default device; made MLX's default for this process."""
    device = requested or ("gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu")
    if device == "gpu" and not mx.is_available(mx.gpu):
        fail(
            "--device gpu: this MLX has no GPU (mlx[cpu] is CPU-only; on Linux with an NVIDIA GPU install "
            "mlx[cuda12] or mlx[cuda13], on a Mac plain mlx), or use --device cpu"
        )
    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    return device


# ---------------------------------------------------------------------------------------
# Optimizer and training step


def learning_rate(args, total_steps):
    if args.schedule == "constant" and not args.warmup:
        return args.lr
    main = (
        optim.cosine_decay(args.lr, max(total_steps - args.warmup, 1))
        if args.schedule == "cosine"
        else lambda step: mx.array(args.lr, mx.float32)
    )
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
        return Adagrad(
            lr,
            initial_accumulator_value=args.initial_accumulator_value,
            lr_decay=args.lr_decay,
            weight_decay=args.weight_decay,
            l1=args.l1,
            l2=args.l2,
            rowwise=embedding_tables(model) if args.rowwise_embeddings else None,
            **eps,
        )
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


def training_step(model, optimizer, token_losses, augment, streams=1, world=1, sparse_embedding=False, cpu_ops=None):
    """step(inputs, targets, scale) -> loss: one optimizer update on a batch, on the default device.

    With streams > 1 (CPU only), the batch's rows are split over that many new CPU streams, whose
    threads take their parts forward and back at the same time. A part's loss is its summed
    cross-entropy times `scale` (see shard), so the parts' losses and gradients add up to the
    batch's; under mlx.launch the processes then average theirs.

    With sparse_embedding (the model's input table an adagrad.SparseEmbedding), each part looks its
    rows up first and differentiates them instead of the table; the processes gather their ids and
    row gradients, and every one applies the same Adagrad.update_rows (with its CPU scatter when
    cpu_ops; None: when the default device is a CPU).
    """
    loss_and_grad = nn.value_and_grad(model, batch_loss)
    cpu_streams = [mx.new_stream(mx.cpu) for _ in range(streams)] if streams > 1 else []

    def part_grads(inputs, targets, scale):
        """(loss, gradients, the gradients of the input tables' looked-up rows or None) of one part."""
        if sparse_embedding:
            rows = model.lookups(inputs)
            return sparse_value_and_grad(model, batch_loss)(rows, targets, scale, token_losses)
        return (*loss_and_grad(model, augment(inputs), targets, scale, token_losses), None)

    def forward_backward(inputs, targets, scale):
        if not cpu_streams:
            return part_grads(inputs, targets, scale)
        parts = []
        for stream, part_inputs, part_targets in zip(
            cpu_streams, split_rows(inputs, streams), split_rows(targets, streams)
        ):
            with mx.stream(stream):
                parts.append(part_grads(part_inputs, part_targets, scale))
        loss = reduce(mx.add, [part[0] for part in parts])
        grads = reduce(partial(tree_map, mx.add), [part[1] for part in parts])
        row_grads = [mx.concatenate(table) for table in zip(*[part[2] for part in parts])] if sparse_embedding else None
        return loss, grads, row_grads

    def step(inputs, targets, scale):
        loss, grads, row_grads = forward_backward(inputs, targets, scale)
        if world > 1:  # every process applies the same averaged gradient, so weights and state stay equal
            grads, loss = nn.average_gradients(grads), mx.distributed.all_sum(loss) / world
            if sparse_embedding:
                inputs = mx.distributed.all_gather(inputs)
                row_grads = [mx.distributed.all_gather(g) / world for g in row_grads]
        optimizer.update(model, grads)
        if sparse_embedding:
            for path, ids, g in zip(model.input_tables(), model.input_ids(inputs), row_grads):
                optimizer.update_rows(model, path, ids, g, cpu_pairs=cpu_ops)
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
# Logging and the training loop


def run_header(args, command, world, tuning, cpu_ops):
    return {
        "command": command,
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "world_size": world},
        "mlx": mx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_tuning.cpu_model(),
        "cores": os.cpu_count(),
        "device": args.device,
        "cpu_ops": cpu_ops,
        "blas": f"{tuning['blas']}, {cpu_tuning.blas_threads()} threads",
        "kernels": tuning["kernels"],
    }


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.device = choose_device(args.device)
    tuning = cpu_tuning.enable(args.cpu_tuning == "on", args.device, restart=argv is None)
    if args.reproduce:
        sys.exit(rerun(args, tuning))
    args = with_defaults(args)
    return train(args, " ".join(["python", "train.py", *(sys.argv[1:] if argv is None else argv)]), tuning)


def train(args, command, tuning):
    """Train as `args` says; return the model and optimizer. Under mlx.launch, data-parallel."""
    group = mx.distributed.init()  # a group of one unless started by mlx.launch
    rank, world = group.rank(), group.size()
    if args.streams > 1 and args.device != "cpu":
        fail(f"--streams {args.streams} splits a batch over CPU threads: use --streams 1 on the {args.device}")
    if args.batch_size < world * args.streams:
        fail(
            f"--batch-size {args.batch_size} is smaller than the {world} process(es) x {args.streams} stream(s): "
            "each needs a share of every batch"
        )
    # The outputs first: a run that cannot save what it does, or would overwrite another's, never starts.
    try:
        claim = args.checkpoint_dir and rank == 0  # the others only read it, to resume
        lock = checkpoint.claim(args.checkpoint_dir, args.resume, args.overwrite) if claim else None
        log = JsonlLog(args.log_file if rank == 0 else None, fresh=not args.resume, overwrite=args.overwrite)
    except (checkpoint.CheckpointError, LogError) as e:
        fail(str(e))
    try:
        return run(args, command, tuning, group, log)
    finally:  # also on every exit through fail(): the folder is free again, the log closed
        log.close()
        if lock:
            lock.close()


def run(args, command, tuning, group, log):
    """The training itself, into outputs train() has checked and claimed."""
    rank, world = group.rank(), group.size()
    say = print if rank == 0 else (lambda *_, **__: None)
    cpu_tuning.set_blas_threads(args.blas_threads)
    cpu_ops = args.device == "cpu" and not args.stock_ops  # models/cpu_ops.py and models/conv.py, or MLX's own
    say(
        f"device: {args.device} ({'CPU formulations' if cpu_ops else 'MLX stock ops'}); "
        f"BLAS: {tuning['blas']}, {cpu_tuning.blas_threads()} threads; compiled kernels: {tuning['kernels']}"
        + (f"; data-parallel on {world} processes" if world > 1 else "")
    )

    mx.random.seed(args.seed)
    try:
        task = (tasks.setup_mnist if args.task == "mnist" else tasks.setup_lm)(args, cpu_ops)
        tasks.check_memory(args, task.model)
    except DataError as e:
        fail(str(e))
    model, batches = task.model, task.batches
    try:
        optimizer = make_optimizer(args, learning_rate(args, args.epochs * batches.per_epoch), model)
    except ValueError as e:
        fail(str(e))
    optimizer.init(model.trainable_parameters())
    for path in model.input_tables() if args.sparse_embeddings else []:
        optimizer.init_rows(model, path)
    state_bytes = sum(v.nbytes for _, v in tree_flatten(optimizer.state))
    say(
        f"{args.optimizer}: optimizer state {state_bytes / 2**20:.2f} MiB for "
        f"{sum(v.size for _, v in tree_flatten(model.parameters())):,} parameters"
    )
    header = run_header(args, command, world, tuning, cpu_ops)
    identity = {k: v for k, v in header["config"].items() if k not in HOW_TO_RUN}
    if rank > 0:  # same initial weights on every process, but its own dropout and augmentation draws
        mx.random.seed(args.seed + rank)

    def write(action, *record):
        """log.write(record), or another action on the log: a failure is one line and exit 2."""
        try:
            action(*record)
        except LogError as e:
            fail(str(e))

    # Where the run stands; a checkpoint stores all of it, so a resumed run logs what this one would have.
    step, epoch, start_batch, window, first_loss, pending_eval = 0, 0, 0, [], None, None
    if args.resume:
        try:
            saved = checkpoint.load(args.checkpoint_dir, model, optimizer, identity, rank)
        except checkpoint.CheckpointError as e:
            fail(str(e))
        step, epoch, start_batch = saved["step"], saved["epoch"], saved["batch"]
        window, first_loss, pending_eval = saved.get("window", []), saved.get("first_loss"), saved.get("pending_eval")
        write(log.resume, saved.get("log_lines"))
        say(f"resumed from {args.checkpoint_dir} at step {step} (epoch {epoch + 1}, batch {start_batch})")
    else:
        write(log.start, header)

    # The compiled step captures these objects: build it only after init and any resume.
    state = [model.state, optimizer.state, mx.random.state]
    train_step = training_step(
        model, optimizer, task.token_losses, task.augment, args.streams, world, args.sparse_embeddings, cpu_ops
    )
    if not args.no_compile:
        train_step = partial(mx.compile, inputs=state, outputs=state)(train_step)

    def save_checkpoint(pending_eval=None):
        nonlocal last_saved
        epoch_, batch = (epoch + 1, 0) if start_batch == batches.per_epoch else (epoch, start_batch)
        run_state = {
            "step": step,
            "epoch": epoch_,
            "batch": batch,
            "config": header["config"],
            "window": window,
            "first_loss": first_loss,
            "pending_eval": pending_eval,
            "log_lines": log.lines,
        }
        checkpoint.save(args.checkpoint_dir, model, optimizer, run_state, group)
        last_saved = (step, pending_eval)

    def evaluate(trained_epoch, rate=""):
        """Evaluate and log on rank 0; the others go on and wait for it at the next gradient average."""
        if rank == 0:
            model.eval()
            metrics, summary = task.evaluate(model, final=step == total_steps)
            model.train()
            write(
                log.write,
                {"step": step, "epoch": trained_epoch, **metrics, "elapsed_s": time.perf_counter() - start_time},
            )
            say(f"epoch {trained_epoch}: step {step}, train loss {loss:.4f}, {summary}{rate}")

    def stop(message, code):
        """Save where the run stands (if it may be saved) and exit with `message`."""
        if bar is not None:
            bar.close()
        saved_now = ""
        if args.checkpoint_dir and code != 2:
            try:
                save_checkpoint(pending_eval)
                saved_now = f"; saved step {step} in {args.checkpoint_dir}: continue with {command} --resume"
            except checkpoint.CheckpointError as e:
                saved_now = f"; {e}"
        if code == 2:
            fail(message)
        print(f"train.py: {message}{saved_now or '; no --checkpoint-dir, so nothing to resume'}", file=sys.stderr)
        sys.exit(code)

    total_steps = min(args.steps or math.inf, args.epochs * batches.per_epoch)
    last_saved = (step, pending_eval) if args.resume else None
    interrupts, bar = Interrupts(world), None
    model.train()
    loss, start_time = float("nan"), time.perf_counter()
    try:
        if pending_eval is not None:  # the run was stopped before it evaluated
            evaluate(pending_eval)
            pending_eval = None
        while step < total_steps:
            bar = tqdm(
                batches.epoch(epoch, start_batch),
                total=batches.per_epoch,
                initial=start_batch,
                desc=f"epoch {epoch + 1}/{args.epochs}",
                leave=False,
                mininterval=0.5,
                disable=rank > 0,
            )
            seen, tic = 0, time.perf_counter()
            for batch in bar:
                loss = train_step(*shard(batch, rank, world))
                mx.eval(state, loss)
                loss = loss.item()
                step, start_batch, seen = step + 1, start_batch + 1, seen + task.per_batch(batch)
                first_loss = loss if first_loss is None else first_loss
                if not math.isfinite(loss) or abs(loss) > DIVERGED * abs(first_loss):
                    stop(
                        f"loss is {loss:.4g} at step {step} (first step: {first_loss:.4g}): training diverged, try a "
                        f"lower --lr{checkpoint.last_good(args.checkpoint_dir)}",
                        2,
                    )
                window.append(loss)
                if step % args.log_every == 0:
                    rate = seen / (time.perf_counter() - tic)
                    write(
                        log.write,
                        {
                            "step": step,
                            "epoch": epoch + 1,
                            "loss": sum(window) / len(window),
                            "lr": optimizer.learning_rate.item(),
                            f"{task.unit}_per_s": rate,
                        },
                    )
                    bar.set_postfix(loss=f"{window[-1]:.3f}", **{f"{task.unit}_per_s": f"{rate:.0f}"}, refresh=False)
                    window = []
                ends = start_batch == batches.per_epoch or step == total_steps
                if args.checkpoint_dir and step % args.checkpoint_every == 0:
                    save_checkpoint(pending_eval=epoch + 1 if ends else None)
                if interrupts.stopped():
                    pending_eval = epoch + 1 if ends else None
                    stop(f"stopped by {interrupts.name} at step {step}", 128 + interrupts.signal)
                if ends:
                    break
            bar.close()
            trained_epoch, rate = epoch + 1, f", {seen / (time.perf_counter() - tic):.0f} {task.unit}/s"
            if start_batch == batches.per_epoch:
                epoch, start_batch, window = epoch + 1, 0, []
            evaluate(trained_epoch, rate)
            if interrupts.stopped():
                stop(f"stopped by {interrupts.name} at step {step}", 128 + interrupts.signal)
        if args.checkpoint_dir and last_saved != (step, None):
            save_checkpoint()
    except checkpoint.CheckpointError as e:
        stop(str(e), 2)
    finally:
        interrupts.restore()
    if args.l1:
        weights = [v for _, v in tree_flatten(model.trainable_parameters())]
        zeros = sum((v == 0).sum().item() for v in weights)
        say(
            f"L1: {zeros:,} of {sum(v.size for v in weights):,} weights are exactly zero "
            f"({100 * zeros / sum(v.size for v in weights):.1f}%)"
        )
    if args.task == "lm" and args.sample and rank == 0:
        print(task.sample(model, args.sample, args.temperature))
    return model, optimizer


# ---------------------------------------------------------------------------------------
# --reproduce LOG


def rerun(args, tuning) -> int:
    """Rerun the first --reproduce-steps steps of a recorded run and compare its logged losses and rates."""
    parser = build_parser()
    try:
        header, recorded = reproduce.read_log(args.reproduce, args.reproduce_steps, vars(args))
    except reproduce.LogError as e:
        fail(str(e))
    group = mx.distributed.init()
    recorded_world = header["config"].get("world_size", 1)
    if recorded_world != group.size():
        fail(
            f"{args.reproduce} was recorded on {recorded_world} process(es), this is {group.size()}: "
            f"run mlx.launch -n {recorded_world} -- python train.py --reproduce {args.reproduce}"
        )
    config = {k: v for k, v in header["config"].items() if k != "world_size"}
    for action in parser._actions:  # a hand-edited log could name a model or dataset this program lacks
        if action.choices and config.get(action.dest) is not None and config[action.dest] not in action.choices:
            fail(
                f"{args.reproduce} records --{action.dest.replace('_', '-')} {config[action.dest]!r}, not one of "
                f"{', '.join(map(str, action.choices))}: it is not a log of this program"
            )
    recorded_args = argparse.Namespace(**{**vars(parser.parse_args([])), **config})  # newer options: defaults
    cache_dir = Path(config["cache_dir"]) if config.get("cache_dir") else None
    if cache_dir is None or not cache_dir.parent.exists():
        cache_dir = parser.get_default("cache_dir")
    with tempfile.TemporaryDirectory() as tmp:
        rerun_log = Path(tmp) / "rerun.jsonl"
        recorded_args = argparse.Namespace(
            **{
                **vars(recorded_args),
                "data_dir": args.data_dir,
                "cache_dir": cache_dir,
                "steps": args.reproduce_steps,
                "log_file": rerun_log,
                "checkpoint_dir": None,
                "resume": False,
                "sample": 0,
                "reproduce": None,
                "device": args.device,
                "stock_ops": args.stock_ops,
                "cpu_tuning": args.cpu_tuning,
            }
        )
        recorded_args = with_defaults(recorded_args)  # fills what an older log left to the defaults of its time
        print(f"reproducing {args.reproduce}: {header['command']} (first {args.reproduce_steps} steps)")
        train(recorded_args, f"python train.py --reproduce {args.reproduce}", tuning)
        if group.rank() > 0:  # rank 0 wrote the log and compares
            return 0
        lines = [json.loads(line) for line in rerun_log.read_text().splitlines()]
    rerun_header, rerun_records = lines[0], {r["step"]: r for r in lines[1:] if "loss" in r}
    exact = reproduce.same_machine(header, rerun_header)
    mismatches = reproduce.compare(recorded, rerun_records, exact)
    print(reproduce.verdict(mismatches, recorded, args.reproduce_steps, exact))
    return 1 if mismatches else 0


if __name__ == "__main__":
    main()
