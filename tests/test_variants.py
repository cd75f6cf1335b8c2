"""The variants: proximal L1/L2, row-wise and heavy-ball Adagrad (adagrad.py), dual averaging (adagrad_da.py)."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from adagrad import Adagrad
from adagrad_da import AdagradDA
from tests.test_adagrad import assert_trees_equal, gradient_sequence, nested_tree, run, train

LR, EPS, L1, L2, MOMENTUM = 0.1, 1e-8, 0.02, 0.05, 0.9
EMBEDDING = lambda path, p: path.startswith("embedding")  # noqa: E731 - the row-wise predicate of these tests

# float32 against a float64 reference over 12 steps: a few float32 roundings per step.
TOLERANCE = dict(rtol=2e-5, atol=1e-6)


def as_numpy(tree):
    return {k: np.array(v, np.float64) for k, v in tree_flatten(tree)}


def reference(kind, params, grads, l1=L1, l2=L2):
    """NumPy float64 transcription of each variant's formula (module docstrings), leaf by leaf."""
    w = as_numpy(params)
    state = {
        k: {"v": np.zeros_like(x), "G": np.zeros_like(x), "m": np.zeros_like(x), "s": np.zeros((x.shape[0], 1))}
        for k, x in w.items()
    }
    for t, g_tree in enumerate(grads, start=1):
        for k, g in as_numpy(g_tree).items():
            st = state[k]
            if kind == "proximal":
                st["v"] += g * g
                a = LR / (np.sqrt(st["v"]) + EPS)
                u = w[k] - a * g
                w[k] = np.sign(u) * np.maximum(np.abs(u) - a * l1, 0) / (1 + a * l2)
            elif kind == "momentum":
                st["v"] += g * g
                st["m"] = MOMENTUM * st["m"] + (1 - MOMENTUM) * g / (np.sqrt(st["v"]) + EPS)
                w[k] = w[k] - LR * st["m"]
            elif kind == "rowwise" and EMBEDDING(k, g) and g.ndim == 2:
                st["s"] += (g * g).mean(axis=1, keepdims=True)
                w[k] = w[k] - LR * g / (np.sqrt(st["s"]) + EPS)
            elif kind == "rowwise":
                st["v"] += g * g
                w[k] = w[k] - LR * g / (np.sqrt(st["v"]) + EPS)
            else:  # dual averaging
                st["G"] += g
                st["v"] += g * g
                w[k] = (
                    -np.sign(st["G"])
                    * LR
                    * np.maximum(np.abs(st["G"]) - l1 * t, 0)
                    / (np.sqrt(st["v"]) + EPS + LR * l2 * t)
                )
    return w


MAKE = {
    "proximal": lambda lr=LR, **kw: Adagrad(lr, l1=L1, l2=L2, **kw),
    "rowwise": lambda lr=LR, **kw: Adagrad(lr, rowwise=EMBEDDING, **kw),
    "momentum": lambda lr=LR, **kw: Adagrad(lr, momentum=MOMENTUM, **kw),
    "da": lambda lr=LR, **kw: AdagradDA(lr, l1=L1, l2=L2, **kw),
}


@pytest.mark.parametrize("l1, l2", [(L1, 0.0), (0.0, L2)], ids=["l1 alone", "l2 alone"])
@pytest.mark.parametrize("kind, make", [("proximal", Adagrad), ("da", AdagradDA)])
def test_each_regulariser_on_its_own_matches_the_float64_reference(kind, make, l1, l2):
    """Each option alone as well as together: a step that drops L2 when L1 is 0 fails here."""
    grads = gradient_sequence(12)
    ours = as_numpy(run(make(LR, l1=l1, l2=l2), nested_tree(0), grads))
    want = reference(kind, nested_tree(0), grads, l1=l1, l2=l2)
    plain = reference("proximal", nested_tree(0), grads, l1=0.0, l2=0.0)
    for key in want:
        np.testing.assert_allclose(ours[key], want[key], **TOLERANCE, err_msg=key)
    assert kind == "da" or any(not np.allclose(want[k], plain[k], **TOLERANCE) for k in want), "the option did nothing"


@pytest.mark.parametrize("kind", list(MAKE))
def test_matches_float64_reference_on_a_nested_tree(kind):
    grads = gradient_sequence(12)  # every fourth step the embedding gradient is zero
    ours = as_numpy(run(MAKE[kind](), nested_tree(0), grads))
    want = reference(kind, nested_tree(0), grads)
    for key in want:
        np.testing.assert_allclose(ours[key], want[key], **TOLERANCE, err_msg=key)


def test_proximal_l1_gives_exact_zeros_and_l1_l2_zero_is_the_plain_update():
    grads = gradient_sequence(12)
    sparse = run(Adagrad(LR, l1=1.0), nested_tree(0), grads)
    zeros = sum((np.array(v) == 0).sum() for _, v in tree_flatten(sparse))
    assert zeros > 0.3 * sum(v.size for _, v in tree_flatten(sparse))
    # Exact: l1 = l2 = 0 takes the plain update's kernel, not the proximal one.
    assert_trees_equal(run(Adagrad(LR, l1=0.0, l2=0.0), nested_tree(0), grads), run(Adagrad(LR), nested_tree(0), grads))


def test_dual_averaging_zeros_coordinates_whose_mean_gradient_is_below_l1():
    optimizer = AdagradDA(LR, l1=0.5)
    w = {"w": mx.full((3,), 7.0)}  # dual averaging ignores the starting point
    for _ in range(4):
        w = optimizer.apply_gradients({"w": mx.array([1.0, 0.4, -2.0])}, w)
    assert w["w"][1].item() == 0.0
    np.testing.assert_allclose(np.array(w["w"]), [-LR * (4 - 2) / 2, 0, LR * (8 - 2) / 4], rtol=1e-6)


def test_rowwise_state_is_one_value_per_row_and_zero_gradient_rows_keep_it():
    params = nested_tree(0)
    optimizer = Adagrad(LR, rowwise=EMBEDDING)
    optimizer.init(params)
    assert optimizer.state["embedding"]["weight"]["v_row"].shape == (11, 1)
    assert "v" in optimizer.state["layers"][0]["weight"]  # other parameters stay dense
    g = tree_map(mx.zeros_like, params)
    g["embedding"]["weight"] = mx.concatenate([mx.ones((3, 4)), mx.zeros((8, 4))])
    for _ in range(2):
        params = optimizer.apply_gradients(g, params)
    v_row = np.array(optimizer.state["embedding"]["weight"]["v_row"]).ravel()
    assert v_row.tolist() == [2.0] * 3 + [0.0] * 8
    assert_trees_equal(params["embedding"]["weight"][3:], nested_tree(0)["embedding"]["weight"][3:])


def test_momentum_zero_is_the_plain_update_and_keeps_no_state():
    grads = gradient_sequence(12)
    with_zero = Adagrad(LR, momentum=0.0)
    assert_trees_equal(run(with_zero, nested_tree(0), grads), run(Adagrad(LR), nested_tree(0), grads))
    assert all(not k.endswith(".m") for k, _ in tree_flatten(with_zero.state))


def test_momentum_averages_the_adagrad_steps():
    """One coordinate, gradient 1 every step: the Adagrad step is 1/sqrt(t) and m its running mean."""
    optimizer = Adagrad(LR, momentum=MOMENTUM)
    w, want, m = {"w": mx.zeros((1,))}, 0.0, 0.0
    for t in range(1, 6):
        w = optimizer.apply_gradients({"w": mx.ones((1,))}, w)
        m = MOMENTUM * m + (1 - MOMENTUM) / (np.sqrt(t) + EPS)
        want -= LR * m
    # float32 against float64: a few roundings a step
    np.testing.assert_allclose(np.array(optimizer.state["w"]["m"]), [m], rtol=1e-6)
    np.testing.assert_allclose(np.array(w["w"]), [want], rtol=1e-6)
    assert abs(want + LR * sum(1 / np.sqrt(np.arange(1, 6)))) > 0.1  # the plain update lands elsewhere


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"momentum": 1.0}, "momentum must be"),
        ({"momentum": -0.1}, "momentum must be"),
        ({"momentum": 1 - 1e-9}, "momentum must be"),  # 1 in float32: m would never move
        ({"momentum": 0.999, "state_dtype": mx.bfloat16}, "momentum must be"),  # 1 in bfloat16
        ({"momentum": 0.9, "l1": 0.1}, "no proximal step"),
    ],
)
def test_momentum_out_of_range_or_with_the_proximal_step_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Adagrad(LR, **kwargs)


# ---------------------------------------------------------------------------------------
# Compile, save/resume, low precision: the same standard as the core optimizer


class Bag(nn.Module):
    """Mean of token embeddings, then a linear layer: an embedding table most rows of which get no gradient."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 4)

    def __call__(self, tokens):
        return self.out(self.embedding(tokens).mean(axis=1))


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def batches(count):
    rng = np.random.default_rng(0)
    for _ in range(count):
        tokens = rng.integers(0, 50, (16, 5)).astype(np.int32)
        yield mx.array(tokens), mx.array(tokens.min(axis=1) % 4)  # learnable: a function of the tokens


def make_training(kind, compiled, state_from=None):
    mx.random.seed(0)
    model = Bag()
    optimizer = MAKE[kind]()
    optimizer.init(model.trainable_parameters())
    if state_from is not None:
        model.load_weights(str(state_from / "model.safetensors"))
        optimizer.state = tree_unflatten(list(mx.load(str(state_from / "optimizer.safetensors")).items()))
        optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state]

    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    return model, optimizer, state, partial(mx.compile, inputs=state, outputs=state)(step) if compiled else step


@pytest.mark.parametrize("kind", list(MAKE))
def test_compiled_equals_eager_bit_for_bit(kind):
    eager_model, eager_opt, eager_state, eager_step = make_training(kind, compiled=False)
    eager = train(eager_step, eager_state, batches(20))
    model, opt, state, step = make_training(kind, compiled=True)
    assert train(step, state, batches(20)) == eager and eager[-1] < eager[0]
    assert_trees_equal(model.parameters(), eager_model.parameters())
    assert_trees_equal(opt.state, eager_opt.state)


@pytest.mark.parametrize("kind", list(MAKE))
def test_save_and_resume_is_bit_exact(tmp_path, kind):
    _, _, state, step = make_training(kind, compiled=True)
    uninterrupted = train(step, state, batches(20))
    model, optimizer, state, step = make_training(kind, compiled=True)
    data = batches(20)
    first = train(step, state, (next(data) for _ in range(8)))
    mx.save_safetensors(str(tmp_path / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    model.save_weights(str(tmp_path / "model.safetensors"))
    _, resumed_optimizer, state, step = make_training(kind, compiled=True, state_from=tmp_path)
    assert first + train(step, state, data) == uninterrupted
    if kind == "rowwise":
        assert resumed_optimizer.state["embedding"]["weight"]["v_row"].shape == (50, 1)


@pytest.mark.parametrize("kind", list(MAKE))
def test_float16_zero_and_large_gradients_stay_finite(kind):
    optimizer = MAKE[kind]()
    w = {"w": mx.ones((2, 3), mx.float16)}
    w = optimizer.apply_gradients({"w": mx.zeros((2, 3), mx.float16)}, w)  # eps is 0 in float16: no 0/0
    assert mx.all(mx.isfinite(w["w"])).item() and w["w"].dtype == mx.float16
    for _ in range(3):
        w = optimizer.apply_gradients({"w": mx.full((2, 3), 1000.0, mx.float16)}, w)  # g*g overflows float16
    assert all(mx.all(mx.isfinite(x)).item() for _, x in tree_flatten(optimizer.state["w"])), optimizer.state


@pytest.mark.parametrize("kind", list(MAKE))
def test_bfloat16_accumulators_count_past_256(kind):
    optimizer = Adagrad(1e-3, rowwise=lambda path, p: True) if kind == "rowwise" else MAKE[kind](1e-3)
    w = {"w": mx.zeros((2, 2), mx.bfloat16)}
    for _ in range(400):
        w = optimizer.apply_gradients({"w": mx.ones((2, 2), mx.bfloat16)}, w)
        mx.eval(w, optimizer.state)
    state = optimizer.state["w"]
    assert all((state[k] == 400).all().item() for k in state if k != "m"), state  # m: a mean of steps, not a count


@pytest.mark.parametrize("make, name", [(Adagrad, "l1"), (Adagrad, "l2"), (AdagradDA, "l1"), (AdagradDA, "l2")])
def test_negative_regularisation_raises(make, name):
    with pytest.raises(ValueError, match=f"{name} must be (finite and )?>= 0"):
        make(0.1, **{name: -1.0})
