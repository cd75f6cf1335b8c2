"""The MNIST recipe: IDX validation, downloads, and train.py end to end on small data."""

import gzip
import hashlib
import http.server
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import train
from data import DataError, mnist
from data.download import ensure_file
from training import checkpoint, options
from training.step import split_rows


def write_idx(path, magic, array, truncate=0):
    raw = (
        magic.to_bytes(4, "big")
        + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
        + array.astype(np.uint8).tobytes()
    )
    data = gzip.compress(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) - truncate] if truncate else data)


def write_small_mnist(root, n_train=250, n_test=100, seed=0):
    """A learnable toy set in the real file layout: the label is which image row is bright."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        images[np.arange(n), 2 * labels + 4, :] = 255
        prefix = "t10k" if split == "test" else "train"
        write_idx(root / "mnist" / f"{prefix}-images-idx3-ubyte.gz", mnist.IMAGE_MAGIC, images)
        write_idx(root / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", mnist.LABEL_MAGIC, labels)
    return root


# ---------------------------------------------------------------------------------------
# IDX files


def test_reads_valid_files(tmp_path):
    data = mnist.load("mnist", write_small_mnist(tmp_path), verify=False)
    assert data["train_images"].shape == (250, 28, 28, 1) and data["train_images"].dtype == np.uint8
    assert data["test_labels"].shape == (100,) and data["test_labels"].max() <= 9


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: write_idx(p, 1234, np.zeros((250, 28, 28))), "magic number 1234"),
        (lambda p: write_idx(p, mnist.IMAGE_MAGIC, np.zeros((250, 28, 28)), truncate=100), "not a complete gzip"),
        (
            lambda p: p.write_bytes(
                gzip.compress(
                    mnist.IMAGE_MAGIC.to_bytes(4, "big")
                    + b"".join(n.to_bytes(4, "big") for n in (250, 28, 28))
                    + bytes(1000)
                )
            ),
            "header says",
        ),
        (lambda p: write_idx(p, mnist.IMAGE_MAGIC, np.zeros((249, 28, 28))), "249 images but"),
        (lambda p: write_idx(p, mnist.IMAGE_MAGIC, np.zeros((250, 32, 32))), "32x32 images"),
        (lambda p: p.write_bytes(b"not gzip at all"), "not a complete gzip"),
    ],
    ids=["magic", "truncated-gz", "short-data", "count-mismatch", "wrong-size", "not-gzip"],
)
def test_bad_files_give_one_line_errors(tmp_path, damage, message):
    write_small_mnist(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    damage(path)
    with pytest.raises(DataError, match=message) as error:
        mnist.load("mnist", tmp_path, verify=False)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


# ---------------------------------------------------------------------------------------
# Downloads, against a server on the loopback address


@pytest.fixture
def file_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_checks_sha256_and_renames(tmp_path, file_server):
    served, url = file_server
    (served / "f.gz").write_bytes(b"payload")
    target = tmp_path / "data" / "f.gz"
    ensure_file(target, [url + "f.gz"], hashlib.sha256(b"payload").hexdigest())
    assert target.read_bytes() == b"payload"
    assert os.listdir(target.parent) == ["f.gz"]


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, file_server):
    served, url = file_server
    (served / "f.gz").write_bytes(b"tampered")
    target = tmp_path / "data" / "f.gz"
    with pytest.raises(DataError, match="sha256"):
        ensure_file(target, [url + "f.gz"], hashlib.sha256(b"payload").hexdigest())
    assert os.listdir(target.parent) == []


def test_no_network_fails_fast_and_says_where_to_put_files(tmp_path):
    target = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    start = time.perf_counter()
    with pytest.raises(DataError, match=f"put train-images-idx3-ubyte.gz .* in {tmp_path / 'mnist'}"):
        ensure_file(target, ["http://127.0.0.1:9/train-images-idx3-ubyte.gz"], "0" * 64)  # port 9: refused
    assert time.perf_counter() - start < 5
    assert os.listdir(target.parent) == []


def test_data_pipeline_order_is_the_seeded_permutation(tmp_path):
    data = mnist.load("mnist", write_small_mnist(tmp_path), verify=False)
    batches = mnist.Batches(data["train_images"], data["train_labels"], 32, seed=3)
    labels = np.concatenate([y for _, y in batches.epoch(1)])
    np.testing.assert_array_equal(labels, data["train_labels"][mnist.epoch_order(250, 3, 1)])
    resumed = np.concatenate([y for _, y in batches.epoch(1, start_batch=5)])
    np.testing.assert_array_equal(resumed, labels[5 * 32 :])
    assert [len(y) for _, y in batches.epoch(0)][-1] == 250 - 7 * 32  # the last batch is partial


def test_random_shift_translates_each_image_with_zero_fill():
    images = np.random.default_rng(0).integers(1, 256, (64, 28, 28, 1), dtype=np.uint8)  # no zeros: fill is visible
    mx.random.seed(5)
    shifted = np.array(mnist.random_shift(mx.array(images), max_shift=2))
    mx.random.seed(5)
    offsets = np.array(mx.random.randint(0, 5, (2, 64))) - 2  # the draw random_shift makes
    for image, out, (dy, dx) in zip(images[..., 0], shifted[..., 0], offsets.T):
        expected = np.pad(image, 2)[2 + dy : 2 + dy + 28, 2 + dx : 2 + dx + 28]  # out[i, j] = image[i + dy, j + dx]
        np.testing.assert_array_equal(out, expected)
    assert len({tuple(o) for o in offsets.T}) > 10  # the shifts differ between images
    np.testing.assert_array_equal(np.array(mnist.random_shift(mx.array(images), max_shift=0)), images)


def test_cnn_pools_before_relu_with_the_same_gradients():
    """models/cnn.py pools before the ReLU. Ties, common over MNIST's blank background (equal
    convolution outputs), must get the same gradient as in the usual order."""
    z = mx.random.normal((2, 8, 8, 3))
    z = mx.where(mx.random.uniform(shape=z.shape) < 0.5, mx.array(0.25), z)  # tied blocks, some positive
    z[:, :2, :2, :] = -0.5  # and blocks tied below zero
    cotangent = mx.random.normal((2, 4, 4, 3))
    pool = nn.MaxPool2d(2, 2)
    usual = mx.vjp(lambda z: pool(nn.relu(z)), [z], [cotangent])
    swapped = mx.vjp(lambda z: nn.relu(pool(z)), [z], [cotangent])
    assert mx.array_equal(usual[0][0], swapped[0][0]) and mx.array_equal(usual[1][0], swapped[1][0])


# ---------------------------------------------------------------------------------------
# train.py end to end


def small_run(tmp_path):
    """train.py's arguments for the tests' own small MNIST in tmp_path (see write_small_mnist)."""
    return ["--data-dir", str(tmp_path), "--verify-data", "off", "--batch-size", "32"]


def run_train(tmp_path, *args, name="run"):
    log = tmp_path / f"{name}.jsonl"
    train.main([*small_run(tmp_path), "--epochs", "2", "--log-every", "1", "--log-file", str(log), *args])
    return [json.loads(line) for line in log.read_text().splitlines()]


def losses(records):
    return [(r["step"], r["loss"]) for r in records[1:] if "loss" in r]


def evaluations(records):
    """Evaluation records without their wall-clock time."""
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records[1:] if "test_acc" in r]


@pytest.mark.parametrize("optimizer, model", [("adagrad", "mlp"), ("adamw", "mlp"), ("adagrad", "cnn")])
def test_compiled_equals_eager(tmp_path, optimizer, model):
    write_small_mnist(tmp_path)
    args = ["--optimizer", optimizer, "--model", model, "--schedule", "cosine", "--warmup", "3", "--steps", "12"]
    compiled = run_train(tmp_path, *args, name="compiled")
    eager = run_train(tmp_path, *args, "--no-compile", name="eager")
    assert losses(compiled) == losses(eager) and len(losses(eager)) == 12


def test_same_seed_same_run_and_other_seed_differs(tmp_path):
    write_small_mnist(tmp_path)
    a, b = run_train(tmp_path, name="a"), run_train(tmp_path, name="b")
    c = run_train(tmp_path, "--seed", "1", name="c")
    assert losses(a) == losses(b) and evaluations(a) == evaluations(b)
    assert losses(a) != losses(c)
    assert losses(a)[-1][1] < losses(a)[0][1]


def test_resume_mid_epoch_equals_uninterrupted(tmp_path):
    write_small_mnist(tmp_path)
    common = ["--schedule", "cosine", "--lr-decay", "0.01"]
    whole = run_train(tmp_path, *common, name="whole")
    ckpt = str(tmp_path / "ckpt")
    first = run_train(tmp_path, *common, "--steps", "5", "--checkpoint-dir", ckpt, name="part")
    assert json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())["batch"] == 5
    second = run_train(tmp_path, *common, "--checkpoint-dir", ckpt, "--resume", name="part")
    assert first == second[: len(first)]  # the log is appended to, not rewritten
    assert losses(second) == losses(whole)
    assert evaluations(second)[-1] == evaluations(whole)[-1]


@pytest.mark.parametrize("streams", ["2", "3"])  # 3: a batch of 32 splits 11 + 11 + 10
def test_streams_split_the_batch_and_their_gradients_add_up(tmp_path, streams):
    write_small_mnist(tmp_path)
    # No dropout or augmentation, whose draws follow the parts; SGD, which (unlike Adagrad's first
    # steps, about lr * sign(g)) does not magnify the rounding of another summation order.
    args = ["--optimizer", "sgd", "--dropout", "0", "--augment-shift", "0", "--steps", "8"]
    one = losses(run_train(tmp_path, *args, name="one"))
    split = losses(run_train(tmp_path, *args, "--streams", streams, name="split"))
    assert [step for step, _ in split] == [step for step, _ in one]
    assert split != one  # other summation order, other last bits
    assert all(math.isclose(a, b, rel_tol=1e-5) for (_, a), (_, b) in zip(split, one))


def test_streams_compiled_equals_eager_and_repeats_bit_for_bit(tmp_path):
    write_small_mnist(tmp_path)
    args = ["--streams", "2", "--steps", "10"]
    compiled, again = run_train(tmp_path, *args, name="compiled"), run_train(tmp_path, *args, name="again")
    eager = run_train(tmp_path, *args, "--no-compile", name="eager")
    assert losses(compiled) == losses(again) == losses(eager) and len(losses(eager)) == 10


def test_bfs_width_changes_the_order_of_work_not_the_results(tmp_path):
    # train.py sets MLX_BFS_MAX_WIDTH, which MLX reads once a process: each width needs its own.
    write_small_mnist(tmp_path)
    runs = {}
    for width in ("20", None):  # MLX's default, then train.py's
        env = {k: v for k, v in os.environ.items() if k != "MLX_BFS_MAX_WIDTH"} | (
            {"MLX_BFS_MAX_WIDTH": width} if width else {}
        )
        log = tmp_path / f"width_{width}.jsonl"
        subprocess.run(
            [
                sys.executable,
                "train.py",
                "--data-dir",
                str(tmp_path),
                "--verify-data",
                "off",
                "--model",
                "cnn",
                "--batch-size",
                "32",
                "--streams",
                "2",
                "--steps",
                "6",
                "--log-every",
                "1",
                "--log-file",
                str(log),
            ],
            cwd=Path(__file__).parents[1],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        runs[width] = [json.loads(line) for line in log.read_text().splitlines()]
    assert losses(runs["20"]) == losses(runs[None]) and len(losses(runs[None])) == 6


def test_checkpoint_from_another_config_is_refused(tmp_path, capsys):
    write_small_mnist(tmp_path)
    ckpt = str(tmp_path / "ckpt")
    run_train(tmp_path, "--steps", "3", "--checkpoint-dir", ckpt)
    for other in (["--model", "cnn"], ["--optimizer", "adamw"], ["--lr", "0.3"]):
        with pytest.raises(SystemExit) as exit_:
            run_train(tmp_path, *other, "--checkpoint-dir", ckpt, "--resume")
        assert exit_.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "another run configuration" in error and other[0][2:] in error


def test_checkpoint_of_an_older_format_is_refused(tmp_path, capsys):
    # Format 1 stored dense weights (out, in): a square layer would load silently transposed.
    write_small_mnist(tmp_path)
    ckpt = tmp_path / "ckpt"
    run_train(tmp_path, "--steps", "3", "--checkpoint-dir", str(ckpt))
    arrays, metadata = mx.load(str(ckpt / "checkpoint.safetensors"), return_metadata=True)
    run_state = json.loads(metadata["run_state"])
    assert run_state.pop("format") == checkpoint.FORMAT
    mx.save_safetensors(str(ckpt / "checkpoint.safetensors"), arrays, metadata={"run_state": json.dumps(run_state)})
    with pytest.raises(SystemExit) as exit_:
        run_train(tmp_path, "--checkpoint-dir", str(ckpt), "--resume")
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint format 1" in error and "new --checkpoint-dir" in error, error


def test_diverging_run_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    write_small_mnist(tmp_path)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(SystemExit) as exit_:
        run_train(
            tmp_path, "--optimizer", "sgd", "--lr", "1e4", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1"
        )
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training diverged" in error
    saved = json.loads((ckpt / "checkpoint.json").read_text())
    assert 0 < saved["step"] and f"step {saved['step']}" in error
    assert sorted(os.listdir(ckpt)) == [".lock", "checkpoint.json", "checkpoint.safetensors"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "-1"], "--lr must be > 0"),
        (["--batch-size", "0"], "--batch-size must be > 0"),
        (["--eps", "0"], r"--eps must be in \(0, 1\], got 0"),
        (["--weight-decay", "-0.1"], r"--weight-decay must be in \[0, 10\]"),
        (["--optimizer", "sgd", "--lr-decay", "0.1"], "option of --optimizer adagrad"),
        (["--resume"], "--resume needs --checkpoint-dir"),
        (["--streams", "0"], "--streams must be > 0"),
        (["--batch-size", "2", "--streams", "3"], "--batch-size 2 is smaller than the 1 process"),
        (["--l1", "-1"], r"--l1 must be in \[0, 10\]"),
        (["--optimizer", "adamw", "--l2", "0.1"], "--l2 is an option of --optimizer adagrad or adagrad-da"),
        (["--rowwise-embeddings"], "--rowwise-embeddings is an option of --task lm, not mnist"),
        (["--dataset", "fashion-mnist"], "is missing and could not be downloaded|put train-images"),
    ],
)
def test_bad_command_lines_give_one_line_errors(tmp_path, capsys, monkeypatch, args, message):
    write_small_mnist(tmp_path)
    monkeypatch.setattr(mnist, "MIRRORS", {"fashion-mnist": ["http://127.0.0.1:9/"], "mnist": []})
    with pytest.raises(SystemExit) as exit_:
        train.main(["--data-dir", str(tmp_path), "--verify-data", "off", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:")
    assert __import__("re").search(message, err[0])


def test_a_recipe_without_a_default_is_refused_not_left_none(tmp_path, capsys, monkeypatch):
    """A model or optimizer without a row in LEARNING_RATES gets one line asking for --lr."""
    write_small_mnist(tmp_path)
    monkeypatch.delitem(options.LEARNING_RATES["mlp"], "sgd")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--data-dir", str(tmp_path), "--verify-data", "off", "--optimizer", "sgd"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "train.py: error: --lr has no default for --model mlp --optimizer sgd: give --lr"
    )
    assert options.parse(["--optimizer", "sgd", "--lr", "0.05"]).lr == 0.05


def test_real_mnist_one_epoch(tmp_path, capsys, real_data):
    train.main(["--data-dir", str(real_data("mnist")), "--epochs", "1", "--log-file", str(tmp_path / "log.jsonl")])
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[0]["config"]["dataset"] == "mnist" and "blas" in records[0]
    # One epoch of the default MLP recipe; the full 24-epoch run reaches 98.87% (README).
    assert records[-1]["test_acc"] >= 0.96


def test_l1_and_dual_averaging_run_and_report_exact_zeros(tmp_path, capsys):
    write_small_mnist(tmp_path)
    for optimizer in ("adagrad", "adagrad-da"):
        records = run_train(tmp_path, "--optimizer", optimizer, "--l1", "1e-3", "--steps", "12", name=optimizer)
        assert records[0]["config"]["l1"] == 1e-3 and len(losses(records)) == 12
        zeros_line = capsys.readouterr().out.strip().splitlines()[-1]
        assert zeros_line.startswith("L1: ") and "weights are exactly zero" in zeros_line
        assert int(zeros_line.split()[1].replace(",", "")) > 0


def test_split_rows_cuts_as_numpy_and_never_makes_an_empty_part():
    assert [part.tolist() for part in split_rows(mx.arange(5), 3)] == [[0, 1], [2, 3], [4]]
    assert [part.tolist() for part in split_rows(mx.arange(1), 2)] == [[0]]  # a last batch of one row
    rows = mx.arange(6)
    assert split_rows(rows, 1)[0] is rows
