"""The training step train.py compiles, and the optimizer it updates.

plain_step is the step as MLX's examples write it. train.py uses it as it is unless asked for one
of three additions, each a function below that the step is built from:

    split_over_streams   --streams N (CPU): the batch's rows split over N CPU streams at once
    averaged             under mlx.launch: the gradients averaged over the processes
    sparse_gradients     --sparse-embeddings: the input tables' looked-up rows differentiated
                         instead of the tables, and updated by SparseAdagrad.update_rows

build_optimizer makes the --optimizer with its options and its learning rate schedule.
"""

from functools import partial, reduce

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from adagrad import Adagrad
from adagrad_da import AdagradDA
from adagrad_sparse import SparseAdagrad, lookup_rows, sparse_value_and_grad
from training.options import OptionError


def plain_step(model, optimizer, loss):
    """step(inputs, targets, scale) -> loss: the gradient of loss(model, inputs, targets, scale)
    with respect to the model's trainable parameters, applied by the optimizer."""
    loss_and_grad = nn.value_and_grad(model, loss)

    def step(inputs, targets, scale):
        value, grads = loss_and_grad(model, inputs, targets, scale)
        optimizer.update(model, grads)
        return value

    return step


def training_step(model, optimizer, loss, streams: int = 1, world: int = 1, sparse: bool = False):
    """plain_step, with the additions the options ask for (the same bits as plain_step without them)."""
    if streams == 1 and world == 1 and not sparse:
        return plain_step(model, optimizer, loss)
    gradients = sparse_gradients(model, loss) if sparse else dense_gradients(model, loss)
    if streams > 1:
        gradients = split_over_streams(gradients, streams)
    if world > 1:
        gradients = averaged(gradients, world)

    def step(inputs, targets, scale):
        value, grads, rows = gradients(inputs, targets, scale)
        optimizer.update(model, grads)
        for path, (ids, row_grads) in rows.items():
            optimizer.update_rows(model, path, ids, row_grads)
        return value

    return step


def dense_gradients(model, loss):
    """(inputs, targets, scale) -> (loss, gradients, {}): plain_step's gradient, with no table's rows."""
    loss_and_grad = nn.value_and_grad(model, loss)

    def gradients(inputs, targets, scale):
        return (*loss_and_grad(model, inputs, targets, scale), {})

    return gradients


def sparse_gradients(model, loss):
    """(inputs, targets, scale) -> (loss, gradients, {table path: (ids, row gradients)}).

    The model's input tables (frozen by SparseAdagrad.init_rows) are looked up first, and the loss
    is differentiated with respect to the rows it looked up (adagrad_sparse.sparse_value_and_grad)."""
    loss_and_grad = sparse_value_and_grad(model, loss)

    def gradients(inputs, targets, scale):
        ids = model.input_ids(inputs)
        value, grads, row_grads = loss_and_grad(lookup_rows(model, ids), targets, scale)
        return value, grads, {path: (ids[path], g) for path, g in zip(ids, row_grads)}

    return gradients


def split_over_streams(gradients, streams: int):
    """`gradients` on `streams` consecutive blocks of the batch's rows, each on a new CPU stream, whose
    threads take their blocks forward and back at the same time; their losses and gradients added.

    Each block's loss is its summed cross-entropy times the batch's `scale`, so the blocks' losses and
    gradients add up to the batch's (in other last bits than one stream's)."""
    cpu_streams = [mx.new_stream(mx.cpu) for _ in range(streams)]

    def split(inputs, targets, scale):
        parts = []
        for stream, part_inputs, part_targets in zip(
            cpu_streams, split_rows(inputs, streams), split_rows(targets, streams)
        ):
            with mx.stream(stream):
                parts.append(gradients(part_inputs, part_targets, scale))
        value = reduce(mx.add, [part[0] for part in parts])
        grads = reduce(partial(tree_map, mx.add), [part[1] for part in parts])
        rows = {
            path: tuple(mx.concatenate(blocks) for blocks in zip(*[part[2][path] for part in parts]))
            for path in parts[0][2]
        }
        return value, grads, rows

    return split


def averaged(gradients, world: int):
    """`gradients` of this process's shard, averaged over the `world` processes (see shard), so that
    every process applies the same update and the weights and optimizer state stay equal."""

    def average(inputs, targets, scale):
        value, grads, rows = gradients(inputs, targets, scale)
        value, grads = mx.distributed.all_sum(value) / world, nn.average_gradients(grads)
        gather = mx.distributed.all_gather
        rows = {path: (gather(ids), gather(g) / world) for path, (ids, g) in rows.items()}
        return value, grads, rows

    return average


def shard(batch, rank, world):
    """This process's rows of a global batch, and its loss scale.

    Each of the `world` processes takes a disjoint slice of the rows. Its loss is its summed
    cross-entropy times world / n, n the targets in the whole batch, so the mean over processes
    of the shard gradients (nn.average_gradients) is the gradient of the global batch mean,
    even when the last batch does not split evenly.
    """
    inputs, targets = (np.array_split(a, world)[rank] for a in batch)
    return mx.array(inputs), mx.array(targets), mx.array(world / batch[1].size, mx.float32)


def split_rows(array, parts):
    """`parts` consecutive blocks of rows, as np.array_split cuts them, but none empty (fewer parts
    when there are fewer rows; one part: the array itself)."""
    parts = min(parts, array.shape[0])
    if parts == 1:
        return [array]
    sizes = [len(block) for block in np.array_split(np.arange(array.shape[0]), parts)]
    return mx.split(array, np.cumsum(sizes)[:-1].tolist())


# The optimizer the step updates: --optimizer, its options and its schedule.


def build_optimizer(config, model, schedule_steps: int):
    """The --optimizer for `model`, its learning rate scheduled over `schedule_steps`, its state created.
    With --sparse-embeddings, SparseAdagrad first freezes the model's input tables, which it then
    updates row by row (adagrad_sparse.py)."""
    optimizer = make_optimizer(config, learning_rate(config, schedule_steps), model)
    for path in model.input_tables() if config.sparse_embeddings else []:
        optimizer.init_rows(model, path)
    optimizer.init(model.trainable_parameters())
    return optimizer


def learning_rate(config, total_steps):
    """--lr under --schedule over `total_steps`, after --warmup steps rising linearly from 0."""
    if config.schedule == "constant" and not config.warmup:
        return config.lr
    main = (
        optim.cosine_decay(config.lr, max(total_steps - config.warmup, 1))
        if config.schedule == "cosine"
        else lambda step: mx.array(config.lr, mx.float32)
    )
    if not config.warmup:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, config.lr, config.warmup), main], [config.warmup])


def embedding_tables(model):
    """A predicate for Adagrad(rowwise=...): true for the weights of the model's nn.Embedding layers."""
    paths = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Embedding)}
    return lambda path, parameter: path in paths


def make_optimizer(config, lr, model):
    """The --optimizer with its options; OptionError for values it refuses."""
    eps = {} if config.eps is None else {"eps": config.eps}
    try:
        if config.optimizer == "adagrad":
            return (SparseAdagrad if config.sparse_embeddings else Adagrad)(
                lr,
                initial_accumulator_value=config.initial_accumulator_value,
                lr_decay=config.lr_decay,
                weight_decay=config.weight_decay,
                l1=config.l1,
                l2=config.l2,
                rowwise=embedding_tables(model) if config.rowwise_embeddings else None,
                momentum=config.momentum,
                **eps,
            )
        if config.optimizer == "adagrad-da":
            return AdagradDA(lr, l1=config.l1, l2=config.l2, **eps)
        if config.optimizer == "mlx-adagrad":
            return optim.Adagrad(lr, **eps)
        if config.optimizer == "sgd":
            return optim.SGD(lr, momentum=0.9, weight_decay=config.weight_decay)
        if config.optimizer == "adam":
            return optim.Adam(lr, **eps)
        return optim.AdamW(lr, weight_decay=config.weight_decay, **eps)
    except ValueError as e:
        raise OptionError(f"--optimizer {config.optimizer}: {e}") from None
