"""Sparse Adagrad updates of embedding tables for MLX: only the rows a batch looked up.

Copy it beside adagrad.py (it needs only ``mlx`` and that file)::

    from adagrad_sparse import SparseAdagrad, SparseEmbedding, sparse_value_and_grad

MLX differentiates parameters densely: an nn.Embedding's gradient is a (rows, dim) array, mostly
zeros, and the optimizer reads and writes the whole table and its state every step. Here the table
is frozen (``SparseAdagrad.init_rows``), the step differentiates the rows it looked up instead, and
``SparseAdagrad.update_rows`` applies them, bit for bit as the dense update would, at a cost set by
the batch, not the table. SparseAdagrad is adagrad.Adagrad with these two methods; everything else
about it is Adagrad's. A model finds its rows with a SparseEmbedding layer (see it for the step), or,
with several tables, by being a SparseInputs, whose rows ``lookup_rows`` looks up.
"""

from collections.abc import Callable
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from adagrad import Adagrad, _get


class SparseAdagrad(Adagrad):
    """adagrad.Adagrad that also updates embedding tables row by row (``init_rows``, ``update_rows``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.momentum:  # a row's m changes every step, looked up or not: no update is sparse
            raise ValueError("SparseAdagrad takes no momentum: its rows would all change every step")

    def init_rows(self, model: nn.Module, path: str):
        """Freeze the table at `path` (an embedding's weight: its gradient comes as the looked-up
        rows', not densely) and create its state, which ``init(model.trainable_parameters())`` then
        skips. Call it before compiling, as ``init``."""
        _branch(model, path).freeze(keys=[path.rsplit(".", 1)[-1]], recurse=False)
        table = _get(model, path)
        state = _branch(self.state, path)
        key = path.rsplit(".", 1)[-1]
        if key not in state:
            state[key] = {}
            if self._is_rowwise(path, table):
                state[key]["v_row"] = self._row_accumulator(table)
            else:
                self.init_single(table, state[key])

    def update_rows(
        self, model: nn.Module, path: str, ids: mx.array, row_gradients: mx.array, cpu_pairs: bool | None = None
    ):
        """Adagrad on the rows of the table at `path` that `ids` name, given the gradient with
        respect to those looked-up rows (``row_gradients[i]`` for ``ids[i]``, duplicates allowed;
        ids in [-rows, rows), a negative id counting from the end, as in a lookup). An id outside
        the table raises IndexError when called eagerly; under ``mx.compile``, where ids cannot be
        read, it is ignored (its gradient masked to zero), so nothing outside the table is ever
        read or written.

        Equal to the dense update on the touched rows, bit for bit: duplicates are summed first,
        in the order they come, as the dense gradient sums them. Untouched rows and their state
        are left as they are. The plain update of a float32 table adds into the table and its
        state in place, at a cost set by ``ids.size``, not by the table's size. With
        weight_decay, l1 or l2 (applied to the touched rows only, where the dense update applies
        them to every row; PyTorch's sparse Adagrad rejects weight decay), or a float16/bfloat16
        table, the new rows are computed from the old ones and written back, which rewrites the
        table: the same result, at a cost that grows with it. Call it after
        ``update(model, grads)``, which advances the step.

        ``cpu_pairs`` (default: when the step runs on a CPU) scatters float32 values two at a time,
        as complex64: MLX's CPU scatter costs per element, and a complex addition is two float32
        additions, so the bits are the same at about half the cost. False: float32 as on a GPU.
        """
        self.init_rows(model, path)
        table, state = _get(model, path), _get(self.state, path)
        ids = ids.reshape(-1)
        if ids.size == 0:  # no rows looked up: nothing to update
            _in_table(ids, table.shape[0], "update_rows")  # but a float id array is still refused
            return
        ids, row_gradients, inside = _checked(ids, row_gradients.reshape(ids.size, *table.shape[1:]), table.shape[0])
        if cpu_pairs is None:
            cpu_pairs = mx.default_device() == mx.cpu
        slot, slot_ids = _runs(ids)
        totals = _segment_sum(slot, row_gradients, cpu_pairs)  # one slot per distinct id, in id order
        lr = self._step_lr()
        key, v = self._accumulator(state, table)
        if self.weight_decay or self.l1 or self.l2 or table.dtype != mx.float32:
            g = totals[slot]  # each entry's id's total: duplicates write the same rows
            rows, v_rows = self._update[key == "v_row"](table[ids], g, v[ids], lr)
            touched = inside.any()  # else every entry points at row 0, which must stay as it is
            table[ids], v[ids] = mx.where(touched, rows, table[ids]), mx.where(touched, v_rows, v[ids])
        else:
            # Slots past the distinct ids hold zeros and point at row 0: adding zero changes nothing.
            square = mx.square(totals)
            if key == "v_row":
                square = square.mean(axis=tuple(range(1, square.ndim)), keepdims=True)
            v = _scatter_add(v, slot_ids, square, cpu_pairs)  # reads nothing from v first: MLX adds in place
            v_rows = v[slot_ids]
            denominator = mx.sqrt(v_rows + self.eps) if self.eps_inside_sqrt else mx.sqrt(v_rows) + self.eps
            table = _scatter_add(table, slot_ids, -(lr.astype(mx.float32) * totals / denominator), cpu_pairs)
        state[key] = v
        _branch(model, path)[path.rsplit(".", 1)[-1]] = table


def _in_table(ids: mx.array, rows: int, who: str):
    """(ids, inside): integer ids (of any integer dtype) as int32 in [0, rows), a negative id counted
    from the end, and which were in the table. IndexError for an id outside it where ids can be read
    (eagerly); under mx.compile the ids outside are replaced by the first valid id (0 if none)."""
    if not mx.issubdtype(ids.dtype, mx.integer):
        raise TypeError(f"{who}: ids must be integers, got {ids.dtype}")
    unsigned = mx.issubdtype(ids.dtype, mx.unsignedinteger)
    inside = ids < rows if unsigned else (ids >= -rows) & (ids < rows)
    try:
        all_inside = inside.all().item()
    except (ValueError, RuntimeError):  # traced by mx.compile: values cannot be read, so mask
        all_inside = None
    if all_inside is False:
        bad = ids[mx.argmin(inside)].item()  # the first id outside
        raise IndexError(f"{who}: id {bad} is outside the table's {rows} rows (ids must be in [-{rows}, {rows}))")
    if not unsigned:
        ids = mx.where(ids < 0, ids + rows, ids)  # -1 is the last row, as in a lookup
    ids = mx.where(inside, ids, ids[mx.argmax(inside)] * inside.any()) if ids.size else ids
    return ids.astype(mx.int32), inside


def _checked(ids: mx.array, row_gradients: mx.array, rows: int):
    """(ids, row_gradients, inside): _in_table's ids, and the gradients of ids outside the table
    replaced by zeros, which change nothing."""
    ids, inside = _in_table(ids, rows, "update_rows")
    return ids, mx.where(inside.reshape(-1, *(1,) * (row_gradients.ndim - 1)), row_gradients, 0), inside


def _runs(ids: mx.array):
    """(slot, slot_ids): each entry's slot, one slot per distinct id numbered in id order, and the
    id of each slot (0 for the slots past the distinct ids). Static shapes, so it compiles."""
    order = mx.argsort(ids)
    sorted_ids = ids[order]
    starts = mx.concatenate([mx.array([True]), sorted_ids[1:] != sorted_ids[:-1]])
    run = mx.cumsum(starts.astype(mx.int32)) - 1  # the run of equal ids each sorted entry is in
    slot = mx.put_along_axis(mx.zeros_like(run), order, run, axis=0)  # the same, for each entry in its place
    slot_ids = mx.zeros(ids.shape, mx.uint32)  # unsigned: MLX's scatter then skips wrapping negative ids
    slot_ids = mx.put_along_axis(slot_ids, run, sorted_ids.astype(mx.uint32), axis=0)  # a run writes one id
    return slot, slot_ids


def _segment_sum(slot: mx.array, values: mx.array, cpu_pairs: bool) -> mx.array:
    """``out[s] = sum of values[i] over the i with slot[i] == s``, added in the order of i, as a
    dense gradient's scatter-add adds them. It is the gradient of ``take_along_axis`` (a scatter-add
    along an axis, which MLX has no public function for; on a CPU it is faster than ``.at[].add``)."""
    if cpu_pairs and _pairs_fit(values):
        return _segment_sum(slot, values.view(mx.complex64), False).view(values.dtype)
    index = mx.broadcast_to(slot.reshape(-1, *(1,) * (values.ndim - 1)), values.shape)
    _, (out,) = mx.vjp(lambda x: mx.take_along_axis(x, index, axis=0), [mx.zeros_like(values)], [values])
    return out


def _scatter_add(target: mx.array, rows: mx.array, values: mx.array, cpu_pairs: bool) -> mx.array:
    """``target.at[rows].add(values)``; with cpu_pairs, on pairs of float32 values viewed as complex64."""
    if cpu_pairs and _pairs_fit(target):
        return target.view(mx.complex64).at[rows].add(values.view(mx.complex64)).view(target.dtype)
    return target.at[rows].add(values)


def _pairs_fit(x: mx.array) -> bool:
    return x.dtype == mx.float32 and x.shape[-1] % 2 == 0


def sum_duplicate_rows(ids: mx.array, row_gradients: mx.array) -> mx.array:
    """For each entry i, the sum of ``row_gradients[j]`` over every j with ``ids[j] == ids[i]``,
    added in the entries' own order (as a dense gradient's scatter-add adds them)."""
    slot, _ = _runs(ids)
    return _segment_sum(slot, row_gradients, mx.default_device() == mx.cpu)[slot]


def _branch(tree, path: str):
    """The dict or list holding the leaf at dotted `path` (modules are dicts)."""
    for key in path.split(".")[:-1]:
        if isinstance(tree, list):
            tree = tree[int(key)]
        else:
            tree = tree.setdefault(key, {}) if isinstance(tree, dict) and not isinstance(tree, nn.Module) else tree[key]
    return tree


class SparseEmbedding(nn.Embedding):
    """nn.Embedding whose table SparseAdagrad updates only where a batch looked it up.

    MLX differentiates parameters densely: nn.Embedding's gradient is a (rows, dim) array, mostly
    zeros, and the optimizer then reads and writes the whole table and its state every step. This
    layer's table is frozen (no dense gradient); the step differentiates the looked-up rows
    instead, and ``SparseAdagrad.update_rows`` applies them. Its call passes rows through, so a model
    built on it runs from tokens or from rows::

        model.embedding = SparseEmbedding(num_embeddings, dims)      # instead of nn.Embedding
        optimizer.init(model.trainable_parameters())
        optimizer.init_rows(model, "embedding.weight")

        def step(tokens, targets):                                   # compile it over the full state
            rows = model.embedding(tokens)                           # the lookup, not differentiated
            loss, grads, row_grads = sparse_value_and_grad(model, loss_fn)(rows, targets)
            optimizer.update(model, grads)                           # every other parameter
            optimizer.update_rows(model, "embedding.weight", tokens, row_grads)
            return loss

    A tied output layer (``as_linear``) would get no gradient from a frozen table: give the model
    an output layer of its own.
    """

    def __init__(self, num_embeddings: int, dims: int):
        super().__init__(num_embeddings, dims)
        self.freeze()

    def __call__(self, x):
        """Rows pass through; ids are looked up, never outside the table (MLX's gather does not check):
        IndexError eagerly, under mx.compile an id outside reads a row inside."""
        if mx.issubdtype(x.dtype, mx.floating):
            return x
        ids, _ = _in_table(x.reshape(-1), self.weight.shape[0], "SparseEmbedding")
        return self.weight[ids].reshape(*x.shape, self.weight.shape[-1])


class SparseInputs(Protocol):
    """A model whose input tables the sparse step updates: it names the tables by their paths, and
    for a batch of inputs the rows each table looks up; it runs from those rows (a tuple, in the
    order of the tables) as it runs from its inputs."""

    def input_tables(self) -> list: ...

    def input_ids(self, inputs) -> dict: ...


def lookup_rows(model: nn.Module, ids: dict) -> tuple:
    """The rows of each table that ``ids`` ({table path: ids}, as ``SparseInputs.input_ids`` gives)
    names, one array per table, never read outside a table (MLX's gather does not check):
    IndexError eagerly, under mx.compile an id outside reads a row inside."""
    rows = []
    for path, table_ids in ids.items():
        table = _get(model, path)
        checked, _ = _in_table(table_ids.reshape(-1), table.shape[0], "lookup_rows")
        rows.append(table[checked].reshape(*table_ids.shape, table.shape[-1]))
    return tuple(rows)


def sparse_value_and_grad(model: nn.Module, fn: Callable):
    """``nn.value_and_grad`` for ``fn(model, rows, *args)`` whose ``rows`` were looked up by a
    SparseEmbedding: returns a function of ``(rows, *args)`` giving (value, grads, row_grads)."""

    def inner(parameters, rows, *args):
        model.update(parameters)
        return fn(model, rows, *args)

    value_and_grad = mx.value_and_grad(inner, argnums=(0, 1))

    def wrapped(rows, *args):
        value, (grads, row_grads) = value_and_grad(model.trainable_parameters(), rows, *args)
        return value, grads, row_grads

    return wrapped
