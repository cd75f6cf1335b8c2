"""Adagrad for MLX, in one file that needs only ``mlx``.

Copy this file into your project::

    from adagrad import Adagrad
    optimizer = Adagrad(learning_rate=0.05)

The math (Duchi, Hazan and Singer, "Adaptive Subgradient Methods for Online
Learning and Stochastic Optimization", JMLR 12, 2011), elementwise per
parameter ``w`` with gradient ``g`` at step ``t = 1, 2, ...``::

    g   <- g + weight_decay * w                     (only if weight_decay > 0)
    lr_t = lr(t) / (1 + (t - 1) * lr_decay)
    v   <- v + g * g                                (v starts at initial_accumulator_value)
    w   <- w - lr_t * g / (sqrt(v) + eps)           ("stable-eps", the default)
    w   <- w - lr_t * g / sqrt(v + eps)             (eps_inside_sqrt=True)

With l1 or l2 > 0, the paper's composite mirror descent (its proximal step) instead,
with the per-coordinate step size a = lr_t / (sqrt(v) + eps)::

    u   <- w - a * g
    w   <- sign(u) * max(|u| - a * l1, 0) / (1 + a * l2)   (exact zeros where |u| <= a * l1)

Row-wise (for embedding tables, as FBGEMM/TorchRec do it): one accumulator per row,
``s <- s + mean(g_row * g_row)`` and ``w_row <- w_row - lr_t * g_row / (sqrt(s) + eps)``.
Optimizer memory for a rows x dim table drops from rows x dim to rows. A row with a zero
gradient keeps its accumulator (without weight_decay).

Options:
    learning_rate             float, or a callable step -> lr (an ``mlx.optimizers`` schedule).
    eps                       > 0. Default 1e-8.
    initial_accumulator_value >= 0. The value ``v`` starts at. Default 0.
    lr_decay                  >= 0. ``torch.optim.Adagrad``'s learning-rate decay. Default 0.
    weight_decay              >= 0. L2 penalty added to the gradient, as torch does. Default 0.
    eps_inside_sqrt           False: ``sqrt(v) + eps``; True: ``sqrt(v + eps)``.
    state_dtype               dtype ``v`` and the update are computed in for
                              float16 / bfloat16 parameters. Default float32.
    l1, l2                    >= 0. Proximal L1 / L2 strengths (above). Default 0: the
                              plain update, bit for bit.
    rowwise                   None, or a predicate (path, parameter) -> bool choosing
                              the parameters (of 2 or more dims) updated row-wise, e.g.
                              ``rowwise=lambda path, p: path.endswith("embedding.weight")``.
                              The paths are those of ``tree_flatten(parameters)``.

How it relates to other libraries:
    * ``mlx.optimizers.Adagrad(lr, eps)``: with the defaults and float32 parameters
      this class gives bit-identical weights and state. It adds the options above,
      low-precision safety, and an update that rewrites w and v in place (MLX's
      allocates both anew every step).
    * ``torch.optim.Adagrad``: same formula (eps after the sqrt), but eps defaults to
      1e-10. ``initial_accumulator_value``, ``lr_decay`` and ``weight_decay`` follow it
      exactly; pass ``eps=1e-10`` to match a torch run.
    * ``optax.adagrad`` and Keras 3 ``Adagrad``: eps inside the sqrt and v starting at
      0.1 (eps 1e-7 in both). Pass ``eps_inside_sqrt=True, initial_accumulator_value=0.1,
      eps=1e-7`` to match them.

Low precision: for float16 / bfloat16 parameters, ``v`` is stored and the whole
update is computed in ``state_dtype``; only the new weight is cast back. So a zero
gradient gives no 0/0 (eps=1e-8 is 0 in float16), |g| >= 256 does not overflow ``v``,
and ``v`` keeps counting past 256 in bfloat16. Updates smaller than the weight's own
precision are still lost when it is cast back (a bfloat16 weight of 1.0 ignores any
step below 2^-8); then keep float32 master weights and give the model bfloat16 copies::

    master = optimizer.apply_gradients(grads, master)                   # float32 tree
    model.update(tree_map(lambda p: p.astype(mx.bfloat16), master))     # bf16 forward

Compiling the training step (the recommended way)::

    model = MyModel(); optimizer = Adagrad(0.05)
    optimizer.init(model.trainable_parameters())      # 1. state must exist before tracing
    # optimizer.state = tree_unflatten(list(mx.load("opt.safetensors").items()))
    #                                                 # 2. load a saved state *before* compiling
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state) # 3. capture the optimizer state too
    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    for x, y in batches:
        loss = step(x, y)
        mx.eval(state)

Traps: compiling with only ``model.state`` captured (as the MLX mnist example does)
freezes ``v`` at its initial value inside the compiled graph: while the batch shape
stays the same, every step sees ``v = g*g`` and Adagrad silently becomes sign-SGD
(``w -= lr * sign(g)``); a new batch shape (an epoch's short last batch) retraces the
step, which then fails with "[eval] Attempting to eval an array without a primitive".
Calling
``optimizer.init`` after compiling, or assigning ``optimizer.state`` afterwards,
leaves the compiled step holding the old state object. A schedule is fine: it is a
function of ``optimizer.step``, which is in the captured state, so it never recompiles.

Speed on a CPU: MLX returns nn.Linear's weight gradient as a transposed view, so this
elementwise update (any optimizer's) reads it column by column; a weight stored (in, out)
and applied as ``x @ w`` gets a row-major gradient, which the update reads in order.

Saving and resuming::

    mx.save_safetensors("opt.safetensors", dict(tree_flatten(optimizer.state)))
    optimizer = Adagrad(0.05)
    optimizer.state = tree_unflatten(list(mx.load("opt.safetensors").items()))

Embedding tables: ``SparseEmbedding`` (instead of ``nn.Embedding``), ``sparse_value_and_grad``
and ``Adagrad.update_rows`` update only the rows a batch looked up, bit for bit as the dense
update does them, at a cost set by the batch, not the table (see SparseEmbedding).

A state saved by ``mlx.optimizers.Adagrad`` for float16 / bfloat16 parameters holds ``v``
in that dtype; loaded here, it is converted to ``state_dtype`` at the first update. The
optimizer can be copied with ``copy.deepcopy`` and, with a float learning rate, pickled.
"""

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.optimizers import Optimizer
from mlx.utils import tree_flatten

_LOW_PRECISION = (mx.float16, mx.bfloat16)


def _make_update(eps: float, weight_decay: float, eps_inside_sqrt: bool, l1: float, l2: float, rowwise: bool):
    """The per-parameter update as two fused kernels, one writing v and one writing w."""

    def update(parameter, gradient, v, lr):
        dtype = v.dtype
        w = parameter.astype(dtype)
        g = gradient.astype(dtype)
        lr = lr.astype(dtype)
        if weight_decay:
            g = g + weight_decay * w
        square = mx.square(g)
        if rowwise:
            square = square.mean(axis=tuple(range(1, g.ndim)), keepdims=True)
        # mx.contiguous (a no-op here) stops mx.compile from fusing both updates into one
        # two-output kernel: MLX never reuses the input buffers of a multi-output kernel,
        # so every step would allocate fresh w and v. Split, each kernel updates in place.
        v = mx.contiguous(v + square)
        denominator = mx.sqrt(v + eps) if eps_inside_sqrt else mx.sqrt(v) + eps
        if l1 or l2:
            step = lr / denominator
            u = w - step * g
            w = mx.sign(u) * mx.maximum(mx.abs(u) - step * l1, 0) / (1 + step * l2)
        else:
            w = w - lr * g / denominator
        return w.astype(parameter.dtype), v

    return mx.compile(update)


class Adagrad(Optimizer):
    """Adagrad with the update ``v += g*g; w -= lr * g / (sqrt(v) + eps)``. See the module docstring."""

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array],
        eps: float = 1e-8,
        initial_accumulator_value: float = 0.0,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        eps_inside_sqrt: bool = False,
        state_dtype: mx.Dtype = mx.float32,
        l1: float = 0.0,
        l2: float = 0.0,
        rowwise: Callable[[str, mx.array], bool] | None = None,
    ):
        super().__init__()
        if not callable(learning_rate) and not 0 <= learning_rate < math.inf:
            raise ValueError(f"Adagrad learning_rate must be finite and >= 0, got {learning_rate}")
        if not eps > 0:  # MLX's wording first, so that tests written against mlx.optimizers.Adagrad pass
            raise ValueError(f"Adagrad epsilon should be >0, {eps} was provided instead (try 1e-8)")
        for name, value in [
            ("initial_accumulator_value", initial_accumulator_value),
            ("lr_decay", lr_decay),
            ("weight_decay", weight_decay),
            ("l1", l1),
            ("l2", l2),
        ]:
            if not value >= 0:
                raise ValueError(f"Adagrad {name} must be >= 0, got {value}")
        if not mx.issubdtype(state_dtype, mx.floating):
            raise ValueError(f"Adagrad state_dtype must be a floating dtype, got {state_dtype}")

        self._maybe_schedule("learning_rate", learning_rate)
        self.eps = eps
        self.initial_accumulator_value = initial_accumulator_value
        self.lr_decay = lr_decay
        self.weight_decay = weight_decay
        self.eps_inside_sqrt = eps_inside_sqrt
        self.state_dtype = state_dtype
        self.l1, self.l2, self.rowwise = l1, l2, rowwise
        self._update = self._make_updates()

    def _make_updates(self):
        options = (self.eps, self.weight_decay, self.eps_inside_sqrt, self.l1, self.l2)
        return {row: _make_update(*options, row) for row in (False, True)}

    def __getstate__(self):
        """For copy.deepcopy and pickle: the compiled updates are rebuilt, the dtype kept by its name."""
        state = {k: v for k, v in self.__dict__.items() if k != "_update"}
        return {**state, "state_dtype": str(self.state_dtype).rsplit(".", 1)[-1]}

    def __setstate__(self, state):
        self.__dict__.update(state, state_dtype=getattr(mx, state["state_dtype"]))
        self._update = self._make_updates()

    def init(self, parameters: dict):
        """Create the state: ``v`` like each parameter, or ``v_row`` of shape (rows, 1) where ``rowwise`` says."""
        super().init(parameters)
        for path, parameter in tree_flatten(parameters) if self.rowwise else []:
            state = _get(self.state, path)
            if self._is_rowwise(path, parameter) and "v_row" not in state:
                del state["v"]  # never computed: MLX arrays are lazy
                state["v_row"] = self._row_accumulator(parameter)

    def _is_rowwise(self, path, parameter):
        return self.rowwise is not None and parameter.ndim >= 2 and self.rowwise(path, parameter)

    def _row_accumulator(self, parameter):
        rows = (parameter.shape[0],) + (1,) * (parameter.ndim - 1)
        return mx.full(rows, self.initial_accumulator_value, self._state_dtype(parameter))

    def _state_dtype(self, parameter):
        return self.state_dtype if parameter.dtype in _LOW_PRECISION else parameter.dtype

    def init_single(self, parameter: mx.array, state: dict):
        state["v"] = mx.full(parameter.shape, self.initial_accumulator_value, self._state_dtype(parameter))

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        key, v = self._accumulator(state, parameter)
        parameter, state[key] = self._update[key == "v_row"](parameter, gradient, v, self._step_lr())
        return parameter

    def _step_lr(self):
        """lr_t = lr(t) / (1 + (t - 1) * lr_decay)."""
        lr = self.learning_rate
        if self.lr_decay:
            lr = lr / (1 + (self.step - 1).astype(lr.dtype) * self.lr_decay)
        return lr

    def _accumulator(self, state, parameter):
        """(key, v): the parameter's accumulator, "v" or "v_row", in its state dtype."""
        key = "v_row" if "v_row" in state else "v"
        v = state[key]
        if v.dtype != self._state_dtype(parameter):  # a state saved by another optimizer: float16 / bfloat16 v
            v = v.astype(self._state_dtype(parameter))
        return key, v

    # -----------------------------------------------------------------------------------
    # Sparse updates: only the rows of a table that a batch looked up (see SparseEmbedding)

    def init_rows(self, model: nn.Module, path: str):
        """Create the state of the table at `path` (a frozen SparseEmbedding's weight, which
        ``init(model.trainable_parameters())`` skips). Call it before compiling, as ``init``."""
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
        ids in [-rows, rows), a negative id counting from the end, as in a lookup).

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
        ids = mx.where(ids < 0, ids + table.shape[0], ids)  # -1 is the last row, as in a lookup
        row_gradients = row_gradients.reshape(ids.size, *table.shape[1:])
        if cpu_pairs is None:
            cpu_pairs = mx.default_device() == mx.cpu
        slot, slot_ids = _runs(ids)
        totals = _segment_sum(slot, row_gradients, cpu_pairs)  # one slot per distinct id, in id order
        lr = self._step_lr()
        key, v = self._accumulator(state, table)
        if self.weight_decay or self.l1 or self.l2 or table.dtype != mx.float32:
            g = totals[slot]  # each entry's id's total: duplicates write the same rows
            rows, v_rows = self._update[key == "v_row"](table[ids], g, v[ids], lr)
            table[ids], v[ids] = rows, v_rows
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


def _get(tree, path: str):
    branch, key = _branch(tree, path), path.rsplit(".", 1)[-1]
    return branch[int(key)] if isinstance(branch, list) else branch[key]


class SparseEmbedding(nn.Embedding):
    """nn.Embedding whose table Adagrad updates only where a batch looked it up.

    MLX differentiates parameters densely: nn.Embedding's gradient is a (rows, dim) array, mostly
    zeros, and the optimizer then reads and writes the whole table and its state every step. This
    layer's table is frozen (no dense gradient); the step differentiates the looked-up rows
    instead, and ``Adagrad.update_rows`` applies them. Its call passes rows through, so a model
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
        return x if mx.issubdtype(x.dtype, mx.floating) else self.weight[x]


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
