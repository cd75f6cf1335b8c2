"""Sparse embedding updates (adagrad_sparse.py: SparseEmbedding, SparseAdagrad.update_rows): equal to
the dense update on the rows a batch touched, the other rows left exactly as they were; compiled, saved and resumed."""

import json
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import train
from adagrad import Adagrad
from adagrad_sparse import SparseAdagrad, SparseEmbedding, sparse_value_and_grad, sum_duplicate_rows
from tests.test_lm import TINY_MODEL, losses, make_text

ROWS, DIM = 50, 6


def batches(steps, seed=0, dim=DIM, negative=False):
    """Ids with heavy repeats (some ids 3-6 times a batch, most rows never) and their row gradients;
    with `negative`, every other id written as its negative counterpart (-1 for the last row)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ids = rng.choice(20, 24, p=np.arange(20, 0, -1) / 210)  # Zipf-like over the first 20 rows
        if negative:
            ids[::2] -= ROWS
        yield mx.array(ids, mx.int32), mx.array(rng.standard_normal((24, dim)), mx.float32)


class Holder(nn.Module):
    def __init__(self, table, sparse):
        super().__init__()
        self.embedding = SparseEmbedding(*table.shape) if sparse else nn.Embedding(*table.shape)
        self.embedding.weight = mx.array(table)


def run(options, sparse, compiled=False, steps=4, rowwise=False, dim=DIM, cpu_pairs=None, negative=False):
    """The table and its state after `steps` updates, sparse or dense."""
    table = np.random.default_rng(1).standard_normal((ROWS, dim)).astype(np.float32)
    model = Holder(table, sparse)
    rows = (lambda path, p: True) if rowwise else None
    optimizer = (SparseAdagrad if sparse else Adagrad)(optim_schedule(), rowwise=rows, **options)
    if sparse:
        optimizer.init(model.trainable_parameters())
        optimizer.init_rows(model, "embedding.weight")
    else:
        optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state]

    def step(ids, row_grads):
        if sparse:
            optimizer.update(model, {})  # no other parameters: this only advances the step
            optimizer.update_rows(model, "embedding.weight", ids, row_grads, cpu_pairs=cpu_pairs)
        else:  # the gradient MLX gives nn.Embedding's table: a scatter-add of the row gradients into zeros
            grad = mx.grad(lambda w: (w[ids] * row_grads).sum())(model.embedding.weight)
            optimizer.update(model, {"embedding": {"weight": grad}})

    if compiled:
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    touched = set()
    for ids, row_grads in batches(steps, dim=dim, negative=negative):
        step(ids, row_grads)
        mx.eval(state)
        touched |= set((np.array(ids) % ROWS).tolist())
    v = optimizer.state["embedding"]["weight"]
    return np.array(model.embedding.weight), np.array(v.get("v", v.get("v_row"))), sorted(touched), table


def optim_schedule():
    return lambda step: 0.1 / mx.sqrt(step.astype(mx.float32) + 1)  # a schedule, so the step count matters


def test_sum_duplicate_rows_matches_numpy():
    ids = mx.array([3, 1, 3, 7, 1, 3, 0], mx.int32)
    grads = mx.arange(7 * 2, dtype=mx.float32).reshape(7, 2)
    got = np.array(sum_duplicate_rows(ids, grads))
    expected = np.stack([np.array(grads)[np.array(ids) == i].sum(0) for i in np.array(ids)])
    np.testing.assert_array_equal(got, expected)


PLAIN = [dict(), dict(initial_accumulator_value=0.1, lr_decay=0.05), dict(eps_inside_sqrt=True, eps=1e-7)]


@pytest.mark.parametrize("options", PLAIN, ids=["defaults", "torch-options", "optax-form"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise", "rowwise"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_sparse_equals_dense_bit_for_bit(options, rowwise, compiled):
    # The same operations on the touched rows: the duplicates summed in their own order, as the dense
    # gradient's scatter-add sums them, then the same elementwise update. A row with no gradient is
    # unchanged by the dense update too (v += 0, w -= 0), so the whole table must match.
    dense_w, dense_v, touched, table = run(options, sparse=False, compiled=compiled, rowwise=rowwise)
    sparse_w, sparse_v, _, _ = run(options, sparse=True, compiled=compiled, rowwise=rowwise)
    np.testing.assert_array_equal(sparse_w, dense_w)
    np.testing.assert_array_equal(sparse_v, dense_v)
    assert len(touched) < ROWS and not np.array_equal(sparse_w[touched], table[touched])


@pytest.mark.parametrize("cpu_pairs", [True, False], ids=["complex64-pairs", "float32-as-on-a-gpu"])
@pytest.mark.parametrize("dim", [6, 5], ids=["even-width", "odd-width"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise", "rowwise"])
def test_both_scatter_formulations_equal_the_dense_update_bit_for_bit(cpu_pairs, dim, rowwise):
    # The complex64 pairs add the same float32 values in the same order (a complex addition adds
    # the real and the imaginary parts); an odd width, which has no pairs, takes the float32 path.
    # Negative ids address rows from the end in the dense lookup: they must meet their row's
    # other ids in one slot, or the accumulator would add two squares instead of one.
    with mx.stream(mx.cpu if cpu_pairs else mx.default_device()):  # the pairs are the CPU's formulation
        dense_w, dense_v, touched, table = run({}, sparse=False, compiled=True, rowwise=rowwise, dim=dim, negative=True)
        sparse_w, sparse_v, _, _ = run(
            {}, sparse=True, compiled=True, rowwise=rowwise, dim=dim, cpu_pairs=cpu_pairs, negative=True
        )
    np.testing.assert_array_equal(sparse_w, dense_w)
    np.testing.assert_array_equal(sparse_v, dense_v)
    assert len(touched) < ROWS and not np.array_equal(sparse_w[touched], table[touched])


@pytest.mark.parametrize("options", [dict(weight_decay=0.1), dict(l1=0.05, l2=0.1)], ids=["weight-decay", "prox"])
@pytest.mark.parametrize("rowwise", [False, True], ids=["elementwise", "rowwise"])
def test_with_decay_or_prox_untouched_rows_stay_and_touched_ones_match_the_dense_update(options, rowwise):
    """One step from the same start: the touched rows as the dense update computes them; the others,
    which the dense update would decay or shrink, exactly as they were."""
    dense_w, dense_v, touched, table = run(options, sparse=False, steps=1, rowwise=rowwise)
    sparse_w, sparse_v, _, _ = run(options, sparse=True, steps=1, rowwise=rowwise)
    untouched = sorted(set(range(ROWS)) - set(touched))
    np.testing.assert_array_equal(sparse_w[touched], dense_w[touched])
    np.testing.assert_array_equal(sparse_v[touched], dense_v[touched])
    np.testing.assert_array_equal(sparse_w[untouched], table[untouched])
    assert not np.array_equal(dense_w[untouched], table[untouched])  # where the two differ, by design


class TinyLM(nn.Module):
    """Embedding, a dense layer, its own output layer (untied)."""

    def __init__(self, sparse):
        super().__init__()
        self.embedding = SparseEmbedding(ROWS, DIM) if sparse else nn.Embedding(ROWS, DIM)
        self.hidden = nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, ROWS)

    def __call__(self, tokens):
        return self.out(nn.relu(self.hidden(self.embedding(tokens))))


def loss_fn(model, tokens, targets):
    return nn.losses.cross_entropy(model(tokens), targets, reduction="mean")


def train_lm(sparse, steps, compiled=True, model=None, optimizer=None, start=0):
    if model is None:
        mx.random.seed(0)
        model, optimizer = TinyLM(sparse), (SparseAdagrad if sparse else Adagrad)(0.1)
        optimizer.init(model.trainable_parameters())
        if sparse:
            optimizer.init_rows(model, "embedding.weight")
    state = [model.state, optimizer.state, mx.random.state]

    def step(tokens, targets):
        if sparse:
            rows = model.embedding(tokens)
            loss, grads, row_grads = sparse_value_and_grad(model, loss_fn)(rows, targets)
            optimizer.update(model, grads)
            optimizer.update_rows(model, "embedding.weight", tokens, row_grads)
        else:
            loss, grads = nn.value_and_grad(model, loss_fn)(model, tokens, targets)
            optimizer.update(model, grads)
        return loss

    if compiled:
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    losses = []
    for ids, _ in list(batches(start + steps))[start:]:
        tokens = ids.reshape(4, 6)
        loss = step(tokens, (tokens * 7 + 3) % ROWS)
        mx.eval(loss, state)
        losses.append(loss.item())
    return losses, model, optimizer


def flat(model, optimizer):
    return dict(tree_flatten(model.parameters())) | {f"opt.{k}": v for k, v in tree_flatten(optimizer.state)}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_model_trains_the_same_with_a_sparse_embedding(compiled):
    dense_losses, dense_model, dense_opt = train_lm(False, 6, compiled)
    sparse_losses, sparse_model, sparse_opt = train_lm(True, 6, compiled)
    assert sparse_losses == dense_losses and sparse_losses[-1] < sparse_losses[0]
    dense, sparse = flat(dense_model, dense_opt), flat(sparse_model, sparse_opt)
    assert dense.keys() == sparse.keys() and all(mx.array_equal(dense[k], sparse[k]) for k in dense)


def test_save_and_resume_is_bit_exact(tmp_path):
    whole, whole_model, whole_opt = train_lm(True, 6)
    first, model, optimizer = train_lm(True, 3)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    mx.save_safetensors(str(tmp_path / "opt.safetensors"), dict(tree_flatten(optimizer.state)))
    mx.random.seed(5)  # other initial weights: the load must replace them all
    resumed_model, resumed_opt = TinyLM(True), SparseAdagrad(0.1)
    resumed_model.update(tree_unflatten(list(mx.load(str(tmp_path / "model.safetensors")).items())))
    resumed_opt.state = tree_unflatten(list(mx.load(str(tmp_path / "opt.safetensors")).items()))
    rest, resumed_model, resumed_opt = train_lm(True, 3, model=resumed_model, optimizer=resumed_opt, start=3)
    assert first + rest == whole
    expected, got = flat(whole_model, whole_opt), flat(resumed_model, resumed_opt)
    assert expected.keys() == got.keys() and all(mx.array_equal(expected[k], got[k]) for k in got)


# ---------------------------------------------------------------------------------------
# train.py --sparse-embeddings


def run_lm(tmp_path, *args, name):
    log = tmp_path / f"{name}.jsonl"
    (tmp_path / "corpus.txt").write_text(make_text())
    train.main(
        [
            *TINY_MODEL,
            "--dataset",
            str(tmp_path / "corpus.txt"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--log-every",
            "1",
            "--steps",
            "12",
            "--log-file",
            str(log),
            *args,
        ]
    )
    return losses([json.loads(line) for line in log.read_text().splitlines()])


@pytest.mark.parametrize("softmax", ["full", "class"])
@pytest.mark.parametrize("buckets", ["0", "5000"], ids=["words", "with-hashed-bigrams"])
@pytest.mark.parametrize("ops", [[], ["--stock-ops"]], ids=["cpu-ops", "stock-ops"])
def test_the_lm_trains_the_same_with_sparse_embedding_updates(tmp_path, softmax, buckets, ops):
    """The same untied model, its input tables updated densely or sparsely: the same bits, with the
    CPU's complex64 scatter and with the float32 one a GPU runs (--stock-ops). On one stream: over two,
    the halves' gradients are summed in another order by the dense and the sparse update."""
    options = ["--softmax", softmax, "--hash-buckets", buckets, "--streams", "1", *ops]
    dense = run_lm(tmp_path, "--untied", *options, name="dense")
    sparse = run_lm(tmp_path, "--sparse-embeddings", *options, name="sparse")
    eager = run_lm(tmp_path, "--sparse-embeddings", *options, "--no-compile", name="eager")
    assert sparse == dense == eager and len(sparse) == 12
    if buckets != "0":  # the bigram table trains: a different run than the words alone
        assert sparse != run_lm(tmp_path, "--sparse-embeddings", "--softmax", softmax, name="words")


def test_sparse_embeddings_resume_exactly(tmp_path):
    whole = run_lm(tmp_path, "--sparse-embeddings", name="whole")
    ckpt = str(tmp_path / "ckpt")
    run_lm(tmp_path, "--sparse-embeddings", "--steps", "5", "--checkpoint-dir", ckpt, name="part")
    resumed = run_lm(tmp_path, "--sparse-embeddings", "--checkpoint-dir", ckpt, "--resume", name="part")
    assert resumed == whole


def test_a_low_precision_state_is_continued_in_state_dtype():
    table = np.random.default_rng(1).standard_normal((ROWS, DIM)).astype(np.float32)
    model, optimizer = Holder(table, sparse=True), SparseAdagrad(0.1)
    optimizer.init_rows(model, "embedding.weight")
    saved = mx.full((ROWS, DIM), 0.5, mx.bfloat16)  # as mlx.optimizers.Adagrad saves it for bfloat16
    optimizer.state["embedding"]["weight"]["v"] = saved
    ids, row_grads = next(batches(1))
    optimizer.update(model, {})
    optimizer.update_rows(model, "embedding.weight", ids, row_grads)
    v = optimizer.state["embedding"]["weight"]["v"]
    touched = sorted(set(np.array(ids).tolist()))
    untouched = sorted(set(range(ROWS)) - set(touched))
    assert v.dtype == mx.float32
    assert (np.array(v)[untouched] == 0.5).all() and (np.array(v)[touched] > 0.5).all()


# ---------------------------------------------------------------------------------------
# Ids outside the table: MLX does not check indices, so update_rows does


@pytest.mark.parametrize("bad", [ROWS, ROWS + 7, -ROWS - 1])
def test_an_id_outside_the_table_raises_when_called_eagerly(bad):
    model, optimizer = Holder(np.zeros((ROWS, DIM), np.float32), sparse=True), SparseAdagrad(0.1)
    optimizer.init(model.trainable_parameters())
    with pytest.raises(IndexError, match=f"id {bad} is outside the table's {ROWS} rows"):
        optimizer.update_rows(model, "embedding.weight", mx.array([1, bad, 2]), mx.ones((3, DIM)))


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1}], ids=["plain", "rewrite"])
def test_compiled_ids_outside_the_table_are_ignored_and_nothing_else_changes(options):
    """Under mx.compile the ids cannot be read: entries outside the table are dropped, so the result
    is the update of the entries inside it, bit for bit, whatever the ids outside are."""
    table = np.random.default_rng(1).standard_normal((ROWS, DIM)).astype(np.float32)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, ROWS, 16).astype(np.int32)
    grads = rng.standard_normal((16, DIM)).astype(np.float32)
    outside = np.array([ROWS, 10**6, -ROWS - 1, 2**31 - 1], np.int32)

    def after(ids, grads):
        model, optimizer = Holder(table, sparse=True), SparseAdagrad(0.1, **options)
        optimizer.init(model.trainable_parameters())
        optimizer.init_rows(model, "embedding.weight")
        state = [model.state, optimizer.state]
        step = mx.compile(
            lambda i, g: optimizer.update_rows(model, "embedding.weight", i, g), inputs=state, outputs=state
        )
        step(mx.array(ids), mx.array(grads))
        mx.eval(state)
        return np.array(model.embedding.weight), np.array(optimizer.state["embedding"]["weight"]["v"])

    mixed_ids = np.concatenate([outside[:2], ids, outside[2:]])
    mixed_grads = np.concatenate([np.full((2, DIM), 1e3, np.float32), grads, np.full((2, DIM), -1e3, np.float32)])
    for got, want in zip(after(mixed_ids, mixed_grads), after(ids, grads)):
        np.testing.assert_array_equal(got, want)
    all_outside_table, all_outside_v = after(outside, np.ones((4, DIM), np.float32))
    np.testing.assert_array_equal(all_outside_table, table)  # not even row 0, which they are pointed at
    np.testing.assert_array_equal(all_outside_v, 0)


def test_momentum_is_refused_since_every_row_would_change_every_step():
    with pytest.raises(ValueError, match="no momentum"):
        SparseAdagrad(0.1, momentum=0.9)
    assert SparseAdagrad(0.1, momentum=0.0).momentum == 0.0
