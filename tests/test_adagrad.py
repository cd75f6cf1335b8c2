"""adagrad.py: exactness against MLX, NumPy and PyTorch, low precision, compile, save/resume."""

import copy
import pickle
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from adagrad import Adagrad


def nested_tree(seed, dtype=mx.float32):
    """Parameters shaped like a real model: dicts of lists of dicts of arrays."""
    key = mx.random.key(seed)
    k = mx.random.split(key, 5)
    return (
        {
            "layers": [
                {"weight": mx.random.normal((8, 5), key=k[0]), "bias": mx.random.normal((8,), key=k[1])},
                {"weight": mx.random.normal((3, 8), key=k[2]), "bias": mx.random.normal((3,), key=k[3])},
            ],
            "embedding": {"weight": mx.random.normal((11, 4), key=k[4])},
        }
        if dtype == mx.float32
        else tree_map(lambda p: p.astype(dtype), nested_tree(seed))
    )


def gradient_sequence(steps, seed=1):
    """Gradients with the tree's structure; every fourth one is zero in the embedding."""
    grads = []
    for t in range(steps):
        g = nested_tree(seed + t)
        if t % 4 == 3:
            g["embedding"]["weight"] = mx.zeros_like(g["embedding"]["weight"])
        grads.append(g)
    return grads


def run(optimizer, params, grads):
    for g in grads:
        params = optimizer.apply_gradients(g, params)
        mx.eval(params, optimizer.state)
    return params


def assert_trees_equal(a, b):
    fa, fb = tree_flatten(a), tree_flatten(b)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (key, x), (_, y) in zip(fa, fb):
        assert x.dtype == y.dtype, key
        assert mx.array_equal(x, y).item(), f"{key} differs"


# ---------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize(
    "learning_rate",
    [
        0.1,
        optim.cosine_decay(0.1, 30),
        optim.join_schedules([optim.linear_schedule(0, 0.1, 5), optim.exponential_decay(0.1, 0.9)], [5]),
    ],
    ids=["constant", "cosine", "warmup+exp"],
)
def test_bit_identical_to_mlx_adagrad(learning_rate):
    ours, theirs = Adagrad(learning_rate), optim.Adagrad(learning_rate)
    grads = gradient_sequence(30)
    assert_trees_equal(run(ours, nested_tree(0), grads), run(theirs, nested_tree(0), grads))
    assert_trees_equal(ours.state, theirs.state)


def torch_adagrad_reference(
    params, grads, lr, eps, initial_accumulator_value=0.0, lr_decay=0.0, weight_decay=0.0, eps_inside_sqrt=False
):
    """NumPy float64 transcription of torch.optim.Adagrad's documented algorithm
    (plus the optax/Keras eps placement), applied leaf by leaf to a flattened tree."""
    params = {k: np.array(v, np.float64) for k, v in tree_flatten(params)}
    state_sum = {k: np.full_like(v, initial_accumulator_value) for k, v in params.items()}
    for t, g_tree in enumerate(grads, start=1):
        for k, g in tree_flatten(g_tree):
            g = np.array(g, np.float64)
            if weight_decay:
                g = g + weight_decay * params[k]
            clr = lr / (1 + (t - 1) * lr_decay)
            state_sum[k] += g * g
            std = np.sqrt(state_sum[k] + eps) if eps_inside_sqrt else np.sqrt(state_sum[k]) + eps
            params[k] = params[k] - clr * g / std
    return params, state_sum


OPTION_SETS = [
    dict(),
    dict(initial_accumulator_value=0.1),
    dict(lr_decay=0.05),
    dict(weight_decay=0.01),
    dict(eps_inside_sqrt=True, initial_accumulator_value=0.1, eps=1e-7),
    dict(initial_accumulator_value=0.5, lr_decay=0.01, weight_decay=0.02, eps=1e-10),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o) or "defaults")
def test_matches_float64_reference(options):
    grads = gradient_sequence(12)
    optimizer = Adagrad(0.05, **options)
    params = run(optimizer, nested_tree(0), grads)
    want_params, want_v = torch_adagrad_reference(nested_tree(0), grads, 0.05, **{"eps": 1e-8, **options})
    # float32 against float64: each of 12 steps rounds a handful of operations at 2^-24,
    # so 1e-5 relative is far above the accumulated error yet far below any real bug.
    for k, w in tree_flatten(params):
        np.testing.assert_allclose(np.array(w), want_params[k], rtol=1e-5, atol=1e-6, err_msg=k)
        v = dict(tree_flatten(optimizer.state))[k + ".v"]
        np.testing.assert_allclose(np.array(v), want_v[k], rtol=1e-5, err_msg=k)


@pytest.mark.parametrize(
    "options", [o for o in OPTION_SETS if not o.get("eps_inside_sqrt")], ids=lambda o: ",".join(o) or "defaults"
)
def test_matches_torch(options):
    torch = pytest.importorskip("torch", reason="torch is not installed; the NumPy transcription above still runs")
    grads = gradient_sequence(12)
    optimizer = Adagrad(0.05, **options)
    params = run(optimizer, nested_tree(0), grads)

    flat = tree_flatten(nested_tree(0))
    tensors = [torch.nn.Parameter(torch.tensor(np.array(p))) for _, p in flat]
    torch_options = {"eps": 1e-8, **options}
    reference = torch.optim.Adagrad(tensors, lr=0.05, **torch_options)
    for g_tree in grads:
        for tensor, (_, g) in zip(tensors, tree_flatten(g_tree)):
            tensor.grad = torch.tensor(np.array(g))
        reference.step()
    # Both float32; torch divides g by std and then scales, we scale then divide (as MLX
    # does), so results agree to a few float32 ulps, not bit for bit.
    for tensor, (key, w) in zip(tensors, tree_flatten(params)):
        np.testing.assert_allclose(np.array(w), tensor.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=key)


# ---------------------------------------------------------------------------------------
# Low precision. Each check runs on stock MLX too, where it must fail (strict xfail): that
# proves the check detects the bug, and tells us the day MLX fixes it.

STOCK_FAILS = pytest.param(
    optim.Adagrad, marks=pytest.mark.xfail(strict=True, reason="stock MLX computes v in the parameter dtype")
)


@pytest.mark.parametrize("make", [Adagrad, STOCK_FAILS], ids=["ours", "mlx"])
def test_float16_zero_gradient_gives_no_nan(make):
    optimizer = make(0.1)
    w = {"w": mx.ones((4,), mx.float16)}
    w = optimizer.apply_gradients({"w": mx.zeros((4,), mx.float16)}, w)
    assert w["w"].dtype == mx.float16
    assert mx.array_equal(w["w"], mx.ones((4,), mx.float16)).item()


@pytest.mark.parametrize("make", [Adagrad, STOCK_FAILS], ids=["ours", "mlx"])
def test_float16_large_gradient_keeps_v_finite(make):
    optimizer = make(0.1)
    w = {"w": mx.zeros((3,), mx.float16)}
    g = {"w": mx.array([256.0, -300.0, 1000.0], mx.float16)}
    for _ in range(3):
        w = optimizer.apply_gradients(g, w)
    mx.eval(w, optimizer.state)
    assert mx.all(mx.isfinite(optimizer.state["w"]["v"])).item()
    assert mx.all(mx.isfinite(w["w"])).item()


@pytest.mark.parametrize("make", [Adagrad, STOCK_FAILS], ids=["ours", "mlx"])
def test_bfloat16_accumulator_counts_past_256(make):
    optimizer = make(1e-3)
    w = {"w": mx.zeros((2,), mx.bfloat16)}
    g = {"w": mx.ones((2,), mx.bfloat16)}
    for _ in range(400):
        w = optimizer.apply_gradients(g, w)
        mx.eval(w, optimizer.state)
    assert (optimizer.state["w"]["v"] == 400).all().item()


def test_low_precision_update_computed_in_state_dtype():
    """For bf16 weights the result equals the float32 update of the same values, cast once."""
    grads = gradient_sequence(5)
    ours = run(
        Adagrad(0.05), nested_tree(0, mx.bfloat16), [tree_map(lambda g: g.astype(mx.bfloat16), g) for g in grads]
    )
    reference = Adagrad(0.05)
    params = tree_map(lambda p: p.astype(mx.float32), nested_tree(0, mx.bfloat16))
    for g in grads:
        updated = reference.apply_gradients(tree_map(lambda x: x.astype(mx.bfloat16).astype(mx.float32), g), params)
        params = tree_map(lambda p: p.astype(mx.bfloat16).astype(mx.float32), updated)
    assert_trees_equal(ours, tree_map(lambda p: p.astype(mx.bfloat16), params))
    assert tree_flatten(reference.state)[1][1].dtype == mx.float32


# ---------------------------------------------------------------------------------------
# Hyperparameter checks


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(learning_rate=0.1, eps=0.0), "eps"),
        (dict(learning_rate=0.1, eps=-1e-8), "eps"),
        (dict(learning_rate=0.1, initial_accumulator_value=-1.0), "initial_accumulator_value"),
        (dict(learning_rate=0.1, lr_decay=-0.1), "lr_decay"),
        (dict(learning_rate=0.1, weight_decay=-0.1), "weight_decay"),
        (dict(learning_rate=0.1, state_dtype=mx.int32), "state_dtype"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Adagrad(**kwargs)


@pytest.mark.parametrize("learning_rate", [float("nan"), float("inf")])
def test_a_learning_rate_that_is_not_finite_raises(learning_rate):
    with pytest.raises(ValueError, match="learning_rate must be finite"):
        Adagrad(learning_rate)


@pytest.mark.parametrize("eps", [0.0, -1e-8])
def test_a_bad_eps_raises_as_mlx_does(eps):
    """A test suite written against mlx.optimizers.Adagrad must pass with ours swapped in."""
    messages = []
    for make in (optim.Adagrad, Adagrad):
        with pytest.raises(ValueError) as error:
            make(0.1, eps=eps)
        messages.append(str(error.value))
    assert ">0" in messages[1] and messages[1].startswith(messages[0]), messages


def test_deepcopy_and_pickle_continue_bit_for_bit():
    params, grads = nested_tree(0, mx.bfloat16), gradient_sequence(6)
    optimizer = Adagrad(0.1, weight_decay=0.01, state_dtype=mx.float32)
    optimizer.init(params)
    for g in grads[:3]:
        params = optimizer.apply_gradients(g, params)
    copies = [copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))]
    runs = []
    for opt in [optimizer, *copies]:
        p = params
        for g in grads[3:]:
            p = opt.apply_gradients(g, p)
        runs.append(dict(tree_flatten((p, opt.state))))
    assert copies[1].state_dtype == mx.float32
    for run in runs[1:]:
        assert run.keys() == runs[0].keys() and all(mx.array_equal(run[k], runs[0][k]) for k in run)


def test_a_low_precision_state_saved_by_mlx_is_continued_in_state_dtype():
    params, grads = nested_tree(0, mx.bfloat16), gradient_sequence(3)
    theirs = optim.Adagrad(0.1)
    theirs.init(params)
    for g in grads[:2]:
        params = theirs.apply_gradients(tree_map(lambda a: a.astype(mx.bfloat16), g), params)
    saved = dict(tree_flatten(theirs.state))
    assert saved["layers.0.weight.v"].dtype == mx.bfloat16
    ours = Adagrad(0.1)
    ours.state = tree_unflatten(list(saved.items()))  # as a resume loads it
    ours.apply_gradients(grads[2], params)
    g = grads[2]["layers"][0]["weight"].astype(mx.float32)
    v = ours.state["layers"][0]["weight"]["v"]
    assert v.dtype == mx.float32
    assert mx.array_equal(v, saved["layers.0.weight.v"].astype(mx.float32) + g * g)


# ---------------------------------------------------------------------------------------
# Compile and save/resume on a small real training loop


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(6, 16), nn.Linear(16, 4)]
        self.dropout = nn.Dropout(0.25)

    def __call__(self, x):
        return self.layers[1](self.dropout(nn.relu(self.layers[0](x))))


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def batches(count, sizes=(16,)):
    rng = np.random.default_rng(0)
    for i in range(count):
        n = sizes[i % len(sizes)]
        yield mx.array(rng.normal(size=(n, 6)).astype(np.float32)), mx.array(rng.integers(0, 4, n).astype(np.int32))


def make_training(compiled, learning_rate=None, traces=None):
    learning_rate = optim.cosine_decay(0.1, 40) if learning_rate is None else learning_rate
    mx.random.seed(0)
    model = MLP()
    optimizer = Adagrad(learning_rate, initial_accumulator_value=0.01, lr_decay=0.001, weight_decay=1e-4)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state]

    def step(x, y):
        if traces is not None:
            traces.append(x.shape)
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    if compiled:
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    return model, optimizer, state, step


def train(step, state, data):
    losses = []
    for x, y in data:
        loss = step(x, y)
        mx.eval(state, loss)
        losses.append(loss.item())
    return losses


def test_compiled_equals_eager_bit_for_bit():
    eager_model, eager_opt, eager_state, eager_step = make_training(compiled=False)
    eager_losses = train(eager_step, eager_state, batches(25))
    model, opt, state, step = make_training(compiled=True)
    losses = train(step, state, batches(25))
    assert losses == eager_losses
    assert losses[-1] < losses[0]
    assert_trees_equal(model.parameters(), eager_model.parameters())
    assert_trees_equal(opt.state, eager_opt.state)


def test_one_trace_per_batch_shape():
    traces = []
    _, _, state, step = make_training(compiled=True, traces=traces)
    train(step, state, batches(24, sizes=(16, 16, 7)))  # a schedule, two batch shapes
    assert sorted(traces) == [(7, 6), (16, 6)]


def test_save_and_resume_is_bit_exact(tmp_path):
    _, _, state, step = make_training(compiled=True)
    uninterrupted = train(step, state, batches(30))

    model, optimizer, state, step = make_training(compiled=True)
    data = batches(30)
    first = train(step, state, (next(data) for _ in range(12)))
    mx.save_safetensors(str(tmp_path / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    model.save_weights(str(tmp_path / "model.safetensors"))
    rng_state = mx.random.state[0]

    # A fresh process would start here: new model, new optimizer, state loaded before compiling.
    model, optimizer, _, _ = make_training(compiled=False)
    model.load_weights(str(tmp_path / "model.safetensors"))
    optimizer.state = tree_unflatten(list(mx.load(str(tmp_path / "optimizer.safetensors")).items()))
    high, low = rng_state.tolist()  # mx.random.key(seed) is [seed >> 32, seed & 0xffffffff]
    mx.random.seed((high << 32) | low)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def resumed_step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    assert first + train(resumed_step, state, data) == uninterrupted


def test_capturing_only_model_state_is_the_documented_trap():
    """Without optimizer.state in the compiled state, v never accumulates (sign-SGD) while the batch
    shape stays fixed, and a new shape crashes the step."""
    mx.random.seed(0)
    model = nn.Linear(3, 1)
    optimizer = Adagrad(0.1)
    optimizer.init(model.trainable_parameters())
    w0 = np.array(model.weight)

    @partial(mx.compile, inputs=model.state, outputs=model.state)
    def step(x, y):
        loss, grads = nn.value_and_grad(model, lambda m, x, y: nn.losses.mse_loss(m(x), y))(model, x, y)
        optimizer.update(model, grads)
        return loss

    x, y = mx.ones((4, 3)), mx.full((4, 1), 100.0)  # far target: the gradient keeps its sign
    for _ in range(3):
        mx.eval(step(x, y), model.state)
    # Three steps of lr * sign(g): exactly 0.3 of movement. Real Adagrad with nearly equal
    # gradients would move about 0.1 * (1 + 1/sqrt(2) + 1/sqrt(3)) = 0.23.
    np.testing.assert_allclose(np.array(model.weight) - w0, 0.3, rtol=1e-5)
    # A new batch shape retraces the step, which then reads the optimizer state the first trace left
    # behind: a crash, as at the short last batch of an epoch.
    with pytest.raises(RuntimeError, match="Attempting to eval an array without a primitive"):
        mx.eval(step(x[:3], y[:3]), model.state)


# ---------------------------------------------------------------------------------------
# As a library: bad arguments are refused where they are given, naming them


@pytest.mark.parametrize("name", ["initial_accumulator_value", "lr_decay", "weight_decay", "l1", "l2"])
def test_an_infinite_hyperparameter_is_refused(name):
    with pytest.raises(ValueError, match=f"Adagrad {name} must be finite in mlx.core.float32, got inf"):
        Adagrad(0.1, **{name: float("inf")})


def test_an_eps_that_is_zero_in_the_state_dtype_is_refused():
    with pytest.raises(ValueError, match="eps 1e-50 is 0 in the state's dtype"):
        Adagrad(0.1, eps=1e-50)  # a positive float64, 0 in float32
    with pytest.raises(ValueError, match="eps 1e-08 is 0 in the state's dtype"):
        Adagrad(0.1, state_dtype=mx.float16)  # 1e-8 underflows float16


@pytest.mark.parametrize("kwargs, name", [({"learning_rate": "0.1"}, "learning_rate"), ({"eps": None}, "eps")])
def test_a_value_of_the_wrong_type_names_its_argument(kwargs, name):
    with pytest.raises(TypeError, match=f"Adagrad {name} must be a number"):
        Adagrad(**{"learning_rate": 0.1, **kwargs})


def test_a_loaded_state_of_another_shape_raises_instead_of_broadcasting():
    params = {"w": mx.ones((3, 4))}
    optimizer = Adagrad(0.1)
    optimizer.init(params)
    optimizer.state["w"]["v"] = mx.zeros((4,))  # would broadcast against (3, 4)
    with pytest.raises(ValueError, match=r"state v has shape \(4,\), its parameter needs \(3, 4\)"):
        optimizer.apply_gradients({"w": mx.ones((3, 4))}, params)
