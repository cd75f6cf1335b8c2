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

A state saved by ``mlx.optimizers.Adagrad`` for float16 / bfloat16 parameters holds ``v``
in that dtype; loaded here, it is converted to ``state_dtype`` at the first update. The
optimizer can be copied with ``copy.deepcopy`` and, with a float learning rate, pickled.
"""

import math
from collections.abc import Callable

import mlx.core as mx
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
            state = self.state
            for key in path.split("."):
                state = state[int(key)] if isinstance(state, list) else state[key]
            if parameter.ndim >= 2 and self.rowwise(path, parameter) and "v_row" not in state:
                del state["v"]  # never computed: MLX arrays are lazy
                rows = (parameter.shape[0],) + (1,) * (parameter.ndim - 1)
                state["v_row"] = mx.full(rows, self.initial_accumulator_value, self._state_dtype(parameter))

    def _state_dtype(self, parameter):
        return self.state_dtype if parameter.dtype in _LOW_PRECISION else parameter.dtype

    def init_single(self, parameter: mx.array, state: dict):
        state["v"] = mx.full(parameter.shape, self.initial_accumulator_value, self._state_dtype(parameter))

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        lr = self.learning_rate
        if self.lr_decay:
            lr = lr / (1 + (self.step - 1).astype(lr.dtype) * self.lr_decay)
        key = "v_row" if "v_row" in state else "v"
        v = state[key]
        if v.dtype != self._state_dtype(parameter):  # a state saved by another optimizer: float16 / bfloat16 v
            v = v.astype(self._state_dtype(parameter))
        parameter, state[key] = self._update[key == "v_row"](parameter, gradient, v, lr)
        return parameter
