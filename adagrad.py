"""Adagrad for MLX, in one file that needs only ``mlx``: copy it into your project.

    from adagrad import Adagrad
    optimizer = Adagrad(learning_rate=0.05)   # v += g*g; w -= lr * g / (sqrt(v) + eps)

With its defaults and float32 parameters it gives the same bits as ``mlx.optimizers.Adagrad``.
``eps=1e-10`` matches ``torch.optim.Adagrad``; ``eps=1e-7, eps_inside_sqrt=True,
initial_accumulator_value=0.1`` matches optax and Keras 3. The options: the class docstring.

Compile the training step over the full state, after ``init`` (and after loading a saved state)::

    optimizer.init(model.trainable_parameters())
    # optimizer.state = tree_unflatten(list(mx.load("opt.safetensors").items()))
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

The trap: capturing only ``model.state`` (as MLX's mnist example does) freezes ``v`` inside the
compiled graph. While the batch shape stays the same every step sees ``v = g*g`` and Adagrad
silently becomes sign-SGD; a new batch shape retraces the step, which then fails with "[eval]
Attempting to eval an array without a primitive". Calling ``init`` or assigning ``state`` after
compiling leaves the step holding the old state. A schedule is fine: it reads ``optimizer.step``.

Save with ``mx.save_safetensors(path, dict(tree_flatten(optimizer.state)))``. Sparse updates of
embedding tables: adagrad_sparse.py. Equivalences, low precision, variants: docs/adagrad.md.
"""

import math
from collections.abc import Callable
from numbers import Real

import mlx.core as mx
from mlx.optimizers import Optimizer
from mlx.utils import tree_flatten

_LOW_PRECISION = (mx.float16, mx.bfloat16)


def _make_update(eps, weight_decay, eps_inside_sqrt, l1, l2, momentum, rowwise: bool):
    """The per-parameter update as fused kernels, one writing v, one w (and one m, with momentum)."""

    def update(parameter, gradient, v, lr, *m):
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
        elif m:
            m = (mx.contiguous(momentum * m[0] + (1 - momentum) * (g / denominator)),)
            w = w - lr * m[0]
        else:
            w = w - lr * g / denominator
        return w.astype(parameter.dtype), v, *m

    return mx.compile(update)


class Adagrad(Optimizer):
    r"""The Adagrad optimizer [1], a drop-in for ``mlx.optimizers.Adagrad`` with PyTorch's options.

    Per parameter ``w`` with gradient ``g`` at step ``t = 1, 2, ...``:

    .. math::

        g &\leftarrow g + \beta w \qquad \text{(weight decay)} \\
        \lambda_t &= \lambda(t) / (1 + (t - 1) \delta) \\
        v &\leftarrow v + g^2 \\
        w &\leftarrow w - \lambda_t \frac{g}{\sqrt{v} + \epsilon}

    With ``l1`` or ``l2`` the paper's proximal step instead, with ``a = lr_t / (sqrt(v) + eps)``:
    ``u = w - a g; w = sign(u) max(|u| - a l1, 0) / (1 + a l2)`` (exact zeros). Row-wise
    parameters keep one accumulator per row: ``s += mean(g_row^2)``. With ``momentum`` (heavy
    ball on the Adagrad step, as ``jax.example_libraries.optimizers.adagrad(step_size, momentum)``):
    ``m = momentum m + (1 - momentum) g / (sqrt(v) + eps); w -= lr_t m``, ``m`` starting at 0.

    [1]: Duchi, Hazan and Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 12, 2011.

    Args:
        learning_rate (float or callable): :math:`\lambda`, or a schedule step -> lr.
        eps (float, optional): :math:`\epsilon` > 0, added after the square root. Default: ``1e-8``
        initial_accumulator_value (float, optional): where ``v`` starts, >= 0. Default: ``0``
        lr_decay (float, optional): :math:`\delta` >= 0, as ``torch.optim.Adagrad``. Default: ``0``
        weight_decay (float, optional): :math:`\beta` >= 0, L2 added to the gradient. Default: ``0``
        eps_inside_sqrt (bool, optional): ``sqrt(v + eps)``, as optax and Keras 3. Default: ``False``
        state_dtype (Dtype, optional): dtype of ``v`` and of the update for float16 / bfloat16
          parameters (only the new weight is cast back). Default: ``float32``
        l1, l2 (float, optional): proximal L1 / L2 strengths, >= 0; 0 gives the plain update,
          bit for bit. Default: ``0``
        rowwise (callable, optional): predicate ``(path, parameter) -> bool`` choosing parameters
          of 2 or more dims to update row-wise (paths as ``tree_flatten`` gives them). Default: ``None``
        momentum (float, optional): in [0, 1), heavy-ball momentum on the step (state ``m``); not with
          ``l1`` or ``l2``. 0 keeps no ``m``, bit for bit the plain update. Default: ``0``
    """

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
        momentum: float = 0.0,
    ):
        super().__init__()
        if not isinstance(state_dtype, mx.Dtype) or not mx.issubdtype(state_dtype, mx.floating):
            raise ValueError(f"Adagrad state_dtype must be a floating dtype, got {state_dtype}")
        hyper = dict(initial_accumulator_value=initial_accumulator_value, lr_decay=lr_decay)
        hyper.update(weight_decay=weight_decay, l1=l1, l2=l2, momentum=momentum, eps=eps)
        hyper = {name: _number(name, value, state_dtype) for name, value in hyper.items()}
        if not callable(learning_rate):
            _number("learning_rate", learning_rate, state_dtype)  # any sign, as MLX takes it
        if not hyper["eps"] > 0:  # MLX's wording first, so that tests written against mlx.optimizers.Adagrad pass
            raise ValueError(f"Adagrad epsilon should be >0, {eps} was provided instead (try 1e-8)")
        for dtype in {mx.float32, state_dtype}:  # float32 parameters update in float32, others in state_dtype
            if not mx.array(hyper["eps"], dtype).item() > 0:
                raise ValueError(f"Adagrad eps {eps} is 0 in the state's dtype {dtype}: use a larger eps")
        for name, value in hyper.items():
            if name != "eps" and not value >= 0:
                raise ValueError(f"Adagrad {name} must be finite and >= 0, got {value}")
        for dtype in {mx.float32, state_dtype}:  # as the update holds it: 1 - 1e-9 is 1 in float32
            if not mx.array(hyper["momentum"], dtype).item() < 1:
                raise ValueError(f"Adagrad momentum must be in [0, 1) in {dtype}, got {momentum}")
        if hyper["momentum"] and (hyper["l1"] or hyper["l2"]):
            raise ValueError("Adagrad momentum has no proximal step: use l1 = l2 = 0 with it")
        eps, initial_accumulator_value, lr_decay = hyper["eps"], hyper["initial_accumulator_value"], hyper["lr_decay"]
        weight_decay, l1, l2 = hyper["weight_decay"], hyper["l1"], hyper["l2"]

        self._maybe_schedule("learning_rate", learning_rate)
        self.eps = eps
        self.initial_accumulator_value = initial_accumulator_value
        self.lr_decay = lr_decay
        self.weight_decay = weight_decay
        self.eps_inside_sqrt = eps_inside_sqrt
        self.state_dtype = state_dtype
        self.l1, self.l2, self.rowwise, self.momentum = l1, l2, rowwise, hyper["momentum"]
        self._update = self._make_updates()

    def _make_updates(self):
        options = (self.eps, self.weight_decay, self.eps_inside_sqrt, self.l1, self.l2, self.momentum)
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
        for path, parameter in tree_flatten(parameters):
            if not mx.issubdtype(parameter.dtype, mx.floating):
                raise TypeError(f"Adagrad cannot train {path}: it is {parameter.dtype}, not floating; freeze it")
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
        if self.momentum:
            state["m"] = mx.zeros(parameter.shape, self._state_dtype(parameter))

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        key, v = self._accumulator(state, parameter)
        expected = parameter.shape if key == "v" else (parameter.shape[0],) + (1,) * (parameter.ndim - 1)
        if v.shape != expected:  # a loaded state of another model: never broadcast it silently
            raise ValueError(f"Adagrad state {key} has shape {v.shape}, its parameter needs {expected}")
        m = ()
        if self.momentum:  # a state saved without momentum starts its m at 0
            m = (state["m"].astype(v.dtype) if "m" in state else mx.zeros(parameter.shape, v.dtype),)
        parameter, state[key], *m = self._update[key == "v_row"](parameter, gradient, v, self._step_lr(), *m)
        if m:
            state["m"] = m[0]
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


def _number(name: str, value, dtype) -> float:
    """`value` (a real number, or an mx.array of one) as a float, checked finite in float32 and in
    `dtype`, the dtypes the update computes in: TypeError or ValueError naming `name`."""
    if isinstance(value, mx.array) and value.size == 1 and mx.issubdtype(value.dtype, mx.number):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"Adagrad {name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    for kind in {mx.float32, dtype}:
        if not math.isfinite(mx.array(value, kind).item()):
            raise ValueError(f"Adagrad {name} must be finite in {kind}, got {value}")
    return value


def _get(tree, path: str):
    """The leaf at dotted `path` (as tree_flatten names it) of a tree of dicts and lists."""
    for key in path.split("."):
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    return tree
