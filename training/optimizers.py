"""The --optimizer with its options and its learning rate schedule, for train.py."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from adagrad import Adagrad
from adagrad_da import AdagradDA
from adagrad_sparse import SparseAdagrad
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


def build(config, model, schedule_steps: int):
    """The --optimizer for `model`, its learning rate scheduled over `schedule_steps`, its state created.
    With --sparse-embeddings, SparseAdagrad first freezes the model's input tables, which it then
    updates row by row (adagrad_sparse.py)."""
    optimizer = make_optimizer(config, learning_rate(config, schedule_steps), model)
    for path in model.input_tables() if config.sparse_embeddings else []:
        optimizer.init_rows(model, path)
    optimizer.init(model.trainable_parameters())
    return optimizer
