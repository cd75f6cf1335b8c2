"""Adagrad dual averaging (RDA) with L1 / L2 for MLX, in one file that needs only ``mlx``.

Duchi, Hazan and Singer (JMLR 2011), "AdaGrad with RDA and l1", elementwise, with
G the sum of all gradients so far, v the sum of their squares and t = 1, 2, ...::

    G <- G + g
    v <- v + g * g
    w <- -sign(G) * lr_t * max(|G| - l1 * t, 0) / (sqrt(v) + eps + lr_t * l2 * t)

The closed form minimises <G/t, w> + l1 |w| + l2/2 w^2 + (sqrt(v) + eps) w^2 / (2 lr_t t):
a coordinate is exactly zero while its average gradient |G| / t stays below l1, which is
what makes dual averaging produce sparser solutions than the proximal step of
``Adagrad(l1=...)``. TensorFlow 1's AdagradDA is this update (there eps is 0 and v
starts at 0.1). It does not use the current weights at all: dual averaging starts
from w = 0 and forgets any initialisation after the first step. That suits linear and
sparse models; a neural network whose units need a random start will not train well.

For float16 / bfloat16 parameters, G, v and the update are kept in ``state_dtype``
(float32 by default) and only the new weight is cast back.

    from adagrad_da import AdagradDA
    optimizer = AdagradDA(learning_rate=0.1, l1=1e-3)
"""

import math
from collections.abc import Callable
from numbers import Real

import mlx.core as mx
from mlx.optimizers import Optimizer
from mlx.utils import tree_flatten

_LOW_PRECISION = (mx.float16, mx.bfloat16)


def _make_update(eps: float, l1: float, l2: float):
    """The update as three single-output kernels (G, v, w), each written in place."""

    def update(parameter, gradient, G, v, lr, t):  # parameter: only its dtype is used
        g = gradient.astype(G.dtype)
        lr, t = lr.astype(G.dtype), t.astype(G.dtype)
        G = mx.contiguous(G + g)  # contiguous: keep the kernels apart so MLX reuses their buffers
        v = mx.contiguous(v + mx.square(g))
        w = -mx.sign(G) * lr * mx.maximum(mx.abs(G) - l1 * t, 0) / (mx.sqrt(v) + eps + lr * l2 * t)
        return w.astype(parameter.dtype), G, v

    return update


class AdagradDA(Optimizer):
    """Adagrad dual averaging with L1 / L2 (see the module docstring). State: ``G`` and ``v``."""

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array],
        l1: float = 0.0,
        l2: float = 0.0,
        eps: float = 1e-8,
        state_dtype: mx.Dtype = mx.float32,
    ):
        super().__init__()
        if not isinstance(state_dtype, mx.Dtype) or not mx.issubdtype(state_dtype, mx.floating):
            raise ValueError(f"AdagradDA state_dtype must be a floating dtype, got {state_dtype}")
        l1, l2, eps = (_number(name, value, state_dtype) for name, value in [("l1", l1), ("l2", l2), ("eps", eps)])
        if not callable(learning_rate) and not _number("learning_rate", learning_rate, state_dtype) >= 0:
            raise ValueError(f"AdagradDA learning_rate must be >= 0, got {learning_rate}")
        if not eps > 0:
            raise ValueError(f"AdagradDA eps must be > 0, got {eps} (try 1e-8)")
        for dtype in {mx.float32, state_dtype}:  # float32 parameters update in float32, others in state_dtype
            if not mx.array(eps, dtype).item() > 0:
                raise ValueError(f"AdagradDA eps {eps} is 0 in the state's dtype {dtype}: use a larger eps")
        for name, value in [("l1", l1), ("l2", l2)]:
            if not value >= 0:
                raise ValueError(f"AdagradDA {name} must be >= 0, got {value}")
        self._maybe_schedule("learning_rate", learning_rate)
        self.l1, self.l2, self.eps, self.state_dtype = l1, l2, eps, state_dtype
        self._update = mx.compile(_make_update(eps, l1, l2))

    def init(self, parameters: dict):
        for path, parameter in tree_flatten(parameters):
            if not mx.issubdtype(parameter.dtype, mx.floating):
                raise TypeError(f"AdagradDA cannot train {path}: it is {parameter.dtype}, not floating; freeze it")
        super().init(parameters)

    def init_single(self, parameter: mx.array, state: dict):
        dtype = self.state_dtype if parameter.dtype in _LOW_PRECISION else parameter.dtype
        state["G"] = mx.zeros(parameter.shape, dtype)
        state["v"] = mx.zeros(parameter.shape, dtype)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        w, state["G"], state["v"] = self._update(
            parameter, gradient, state["G"], state["v"], self.learning_rate, self.step
        )
        return w


def _number(name: str, value, dtype) -> float:
    """`value` (a real number, or an mx.array of one) as a float, checked finite in float32 and in
    `dtype`, the dtypes the update computes in: TypeError or ValueError naming `name`."""
    if isinstance(value, mx.array) and value.size == 1 and mx.issubdtype(value.dtype, mx.number):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"AdagradDA {name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    for kind in {mx.float32, dtype}:
        if not math.isfinite(mx.array(value, kind).item()):
            raise ValueError(f"AdagradDA {name} must be finite in {kind}, got {value}")
    return value
