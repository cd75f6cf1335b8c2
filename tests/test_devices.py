"""One recipe for every MLX device: the step runs on the default device with no stream context, and
MLX's stock formulations (what a GPU runs) agree with the CPU ones, checked here on the CPU."""

import json
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import train
from models.cnn import CNN
from models.ops import CPU, STOCK
from models.transformer import Transformer
from tests.test_lm import TINY_MODEL, make_text
from tests.test_mnist import losses, run_train, write_small_mnist
from training import options

REPO = Path(__file__).parents[1]


def test_one_stream_enters_no_stream_context(tmp_path, monkeypatch):
    """mx.stream also sets the device: with --streams 1 the step must leave MLX's default device alone."""
    write_small_mnist(tmp_path)

    def no_stream(*args, **kwargs):
        raise AssertionError("the step entered mx.stream")

    monkeypatch.setattr(mx, "stream", no_stream)
    records = run_train(tmp_path, "--steps", "3", "--no-compile")
    records += run_train(tmp_path, "--steps", "3", "--model", "cnn", name="compiled")
    assert len(losses(records)) == 6 and records[0]["device"] == "cpu" and records[0]["cpu_ops"]


def gradients(model, loss):
    value, grads = nn.value_and_grad(model, loss)(model)
    return value, dict(tree_flatten(grads))


def assert_close(ours, stock, rtol, what):
    assert ours.keys() == stock.keys(), what
    for name in ours:
        a, b = np.array(ours[name]), np.array(stock[name])
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=f"{what}: {name}")


@pytest.mark.parametrize("softmax", ["full", "class"])
def test_transformer_stock_ops_match_the_cpu_ones(softmax):
    models = {}
    for cpu_ops in (True, False):
        mx.random.seed(3)
        models[cpu_ops] = Transformer(97, 16, layers=2, dim=32, heads=4, softmax=softmax, ops=CPU if cpu_ops else STOCK)
    assert_close(
        dict(tree_flatten(models[True].parameters())),
        dict(tree_flatten(models[False].parameters())),
        0,
        "same parameters under the same names",
    )
    tokens = mx.random.randint(0, 97, (4, 17), key=mx.random.key(1))
    results = {
        cpu_ops: gradients(model, lambda m: m.nll(tokens[:, :-1], tokens[:, 1:]).mean())
        for cpu_ops, model in models.items()
    }
    # Attention is the same arithmetic as MLX's CPU attention (same bits); the full softmax's
    # cross-entropy sums exps / total where MLX takes exp(z - logsumexp): float32 rounding of a
    # 97-term sum, ~1e-6 relative, carried back through two blocks.
    assert abs(results[True][0].item() - results[False][0].item()) <= 1e-6 * abs(results[False][0].item())
    assert_close(results[True][1], results[False][1], 1e-5, "gradients")


def test_cnn_stock_ops_match_the_cpu_ones():
    models = {}
    for cpu_ops in (True, False):
        mx.random.seed(4)
        models[cpu_ops] = CNN(dropout=0.0, ops=CPU if cpu_ops else STOCK)
    images = mx.random.randint(0, 256, (8, 28, 28, 1), key=mx.random.key(2)).astype(mx.uint8)
    labels = mx.random.randint(0, 10, (8,), key=mx.random.key(3))
    results = {
        cpu_ops: gradients(model, lambda m: nn.losses.cross_entropy(m(images), labels, reduction="mean"))
        for cpu_ops, model in models.items()
    }
    # Winograd's and the unfolded convolution sum the same products in other orders than MLX's conv:
    # equal within float32 rounding of sums of ~300-600 terms (tests/test_conv.py checks each block).
    assert abs(results[True][0].item() - results[False][0].item()) <= 1e-5 * abs(results[False][0].item())
    assert_close(results[True][1], results[False][1], 1e-4, "gradients")


@pytest.mark.parametrize("task", ["cnn", "lm"])
def test_stock_ops_train_and_a_checkpoint_resumes_on_the_other_path(tmp_path, task):
    if task == "cnn":
        write_small_mnist(tmp_path)
        args = [
            "--model",
            "cnn",
            "--lr",
            "0.05",
            "--batch-size",
            "32",
            "--epochs",
            "4",
            "--data-dir",
            str(tmp_path),
            "--verify-data",
            "off",
        ]
    else:
        (tmp_path / "corpus.txt").write_text(make_text())
        args = [
            *TINY_MODEL,
            "--dataset",
            str(tmp_path / "corpus.txt"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--lr",
            "0.05",
        ]
    ckpt = str(tmp_path / "ckpt")

    def run(name, *more):
        train.main([*args, "--log-every", "1", "--log-file", str(tmp_path / f"{name}.jsonl"), *more])
        return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]

    stock = run("stock", "--stock-ops", "--steps", "30")
    steps = [loss for _, loss in losses(stock)]
    assert stock[0]["cpu_ops"] is False and np.mean(steps[-5:]) < np.mean(steps[:5]) - 0.2
    part = run("part", "--stock-ops", "--steps", "20", "--checkpoint-dir", ckpt)
    resumed = run("part", "--steps", "30", "--checkpoint-dir", ckpt, "--resume")  # on the CPU formulations
    assert losses(resumed)[:20] == losses(part)[:20] == losses(stock)[:20]
    # From step 21 the CPU formulations round differently: close to the all-stock run, not equal.
    np.testing.assert_allclose([loss for _, loss in losses(resumed)[20:]], steps[20:], rtol=1e-3)


@pytest.mark.skipif(mx.is_available(mx.gpu), reason="this MLX has a GPU: --device gpu is valid here")
def test_device_gpu_without_a_gpu_is_one_line(tmp_path):
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "train.py", "--device", "gpu", "--data-dir", str(tmp_path), "--verify-data", "off"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and time.perf_counter() - start < 30
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: --device gpu: this MLX has no GPU"), done.stderr


def test_streams_on_a_gpu_step_are_one_line(tmp_path, monkeypatch, capsys):
    # No GPU here: the device choice is stubbed, and the check comes before any work on the device.
    write_small_mnist(tmp_path)
    monkeypatch.setattr(train, "use_device", lambda device: None)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--device", "gpu", "--data-dir", str(tmp_path), "--verify-data", "off", "--streams", "2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1
    assert lines[0] == "train.py: error: --streams is an option of --device cpu, not gpu"


def test_the_language_models_split_their_batch_over_two_cpu_streams_by_default():
    assert options.complete({"task": "lm", "device": "cpu"}).streams == 2
    assert options.complete({"task": "lm", "device": "gpu"}).streams == 1  # streams are CPU threads
    assert options.complete({"task": "mnist", "device": "cpu"}).streams == 1
    assert options.complete({"task": "lm"}).device == options.default_device()
