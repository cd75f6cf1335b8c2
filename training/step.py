"""The optimizer and the training step train.py compiles: one update on one batch, on the default
device, over several CPU streams (--streams) or processes (mlx.launch) as asked."""

from functools import partial, reduce

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from adagrad import Adagrad
from adagrad_da import AdagradDA
from adagrad_sparse import SparseAdagrad, sparse_value_and_grad
from training.options import OptionError


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


def training_step(model, optimizer, token_losses, augment, streams=1, world=1, sparse_embedding=False, ops=None):
    """step(inputs, targets, scale) -> loss: one optimizer update on a batch, on the default device.

    With streams > 1 (CPU only), the batch's rows are split over that many new CPU streams, whose
    threads take their parts forward and back at the same time. A part's loss is its summed
    cross-entropy times `scale` (see shard), so the parts' losses and gradients add up to the
    batch's; under mlx.launch the processes then average theirs.

    With sparse_embedding (the model's input table an adagrad_sparse.SparseEmbedding), each part
    looks its rows up first and differentiates them instead of the table; the processes gather
    their ids and row gradients, and every one applies the same SparseAdagrad.update_rows (with the
    scatter of `ops`, models/ops.py; None: the CPU's when the default device is a CPU).
    """
    loss_and_grad = nn.value_and_grad(model, batch_loss)
    cpu_streams = [mx.new_stream(mx.cpu) for _ in range(streams)] if streams > 1 else []
    cpu_pairs = None if ops is None else ops.scatter_pairs

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
                optimizer.update_rows(model, path, ids, g, cpu_pairs=cpu_pairs)
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
