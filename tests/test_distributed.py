"""Data-parallel training under mlx.launch: 2 processes on localhost against 1 process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import train
from tests.test_lm import TINY_MODEL, make_text
from tests.test_mnist import losses, small_run, write_small_mnist
from training.step import shard

REPO = Path(__file__).parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")
needs_launcher = pytest.mark.skipif(
    not mx.distributed.is_available() or not LAUNCH.exists(),
    reason=f"needs MLX's distributed support and its launcher ({LAUNCH})",
)


def train_args(task, tmp_path):
    """A short run on data the test writes, logging every step."""
    if task == "mnist":
        write_small_mnist(tmp_path)
        return [*small_run(tmp_path), "--epochs", "2", "--log-every", "1"]
    (tmp_path / "corpus.txt").write_text(make_text())
    return [
        *TINY_MODEL,
        "--dataset",
        str(tmp_path / "corpus.txt"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--steps",
        "12",
        "--log-every",
        "1",
    ]


def free_ports(count):
    """The first of `count` consecutive localhost ports that are free now."""
    while True:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            start = first.getsockname()[1]
            others = [socket.socket() for _ in range(count - 1)]
            try:
                for offset, other in enumerate(others, 1):
                    other.bind(("127.0.0.1", start + offset))
                return start
            except OSError:
                continue
            finally:
                for other in others:
                    other.close()


def launch(tmp_path, name, *args, processes=2, log=None):
    """Run train.py on `processes` local processes; return its log records and each rank's final arrays."""
    out = tmp_path / name
    out.mkdir()
    log = log or out / "log.jsonl"
    command = [
        str(LAUNCH),
        "-n",
        str(processes),
        "--backend",
        "ring",
        "--starting-port",
        str(free_ports(processes)),  # never another launch's: two test runs on one machine do not collide
        "--",
        sys.executable,
        str(REPO / "tests" / "distributed_worker.py"),
        str(out),
        *args,
        "--log-file",
        str(log),
    ]
    # mlx.launch leaves its host and port files in TMPDIR, which cpu_tuning.enable() points at the kernel cache.
    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ | {"TMPDIR": str(out)}
    )
    output = f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    assert done.returncode == 0, output
    # mlx.launch exits 0 even when one rank failed: each rank must have written its result.
    missing = [r for r in range(processes) if not (out / f"rank{r}.safetensors").exists()]
    assert not missing, f"rank(s) {missing} did not finish\n{output}"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return records, [mx.load(str(out / f"rank{r}.safetensors")) for r in range(processes)], done


def test_shards_are_disjoint_cover_the_batch_and_scale_to_its_mean():
    images, labels = np.arange(7 * 3).reshape(7, 3), np.arange(7)
    shards = [shard((images, labels), rank, 3) for rank in range(3)]
    assert np.concatenate([np.array(targets) for _, targets, _ in shards]).tolist() == labels.tolist()
    assert [len(targets) for _, targets, _ in shards] == [3, 2, 2]
    assert all(scale.item() == np.float32(3 / 7) for _, _, scale in shards)
    # mean over processes of (shard sum * world / n) is the global mean
    per_process = [np.array(targets).sum() * scale.item() for _, targets, scale in shards]
    assert np.isclose(np.mean(per_process), labels.mean())
    ((inputs, targets, scale),) = [shard((images, labels), 0, 1)]
    assert np.array_equal(np.array(inputs), images) and np.array_equal(np.array(targets), labels)
    assert scale.item() == np.float32(1 / 7)


@needs_launcher
@pytest.mark.parametrize("task", ["mnist", "lm", "lm-sparse"])
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, task):
    # No dropout or augmentation: each process draws its own, so only their absence makes the runs comparable.
    # lm-sparse: the processes gather their embedding ids and row gradients (--sparse-embeddings).
    sparse = ["--sparse-embeddings"] if task == "lm-sparse" else []
    task = "lm" if sparse else task
    args = train_args(task, tmp_path) + ["--dropout", "0"] + (["--augment-shift", "0"] if task == "mnist" else [])
    args += sparse
    one = train.main([*args, "--log-file", str(tmp_path / "one.jsonl")])
    one_log = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two_log, (rank0, rank1), done = launch(tmp_path, "two", *args)

    assert two_log[0]["config"]["world_size"] == 2 and one_log[0]["config"]["world_size"] == 1
    assert done.stdout.count("device: ") == 1, "only rank 0 prints"
    # Two shard sums averaged round differently from one batch sum (float32 reduction order);
    # those last-bit differences grow over the steps but stay far below 1e-4 here.
    (steps_one, loss_one), (steps_two, loss_two) = zip(*losses(one_log)), zip(*losses(two_log))
    assert steps_one == steps_two and len(steps_one) >= 12
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-4)
    # Every process applies the same averaged gradient: weights and Adagrad state equal bit for bit.
    assert rank0.keys() == rank1.keys() and any(k.endswith(".v") for k in rank0)
    for key in rank0:
        assert mx.array_equal(rank0[key], rank1[key]).item(), key
    # And close to the one-process weights. Adagrad's step g / sqrt(v) is at most lr per coordinate and
    # divides out the gradient's scale, so where v is still tiny a rounding difference in g moves a weight
    # by a sizeable part of a step. Nearly all weights agree within 1e-4; a few move further (measured: 1 of
    # 4096 in one matrix, by 2.7e-4, on an AMD EPYC of family 25, model 1), none by a whole step.
    model, _ = one
    lr = one_log[0]["config"]["lr"]
    for key, value in tree_flatten(model.parameters()):
        value = np.array(value)
        off = np.abs(np.array(rank0[f"model.{key}"]) - value)
        assert (off > 1e-4 + 1e-4 * np.abs(value)).mean() <= 1e-3 and off.max() < lr, (key, off.max())


@needs_launcher
def test_resume_on_two_processes_equals_uninterrupted_and_refuses_one(tmp_path, capsys):
    args = train_args("mnist", tmp_path)  # with dropout and augmentation: each rank's RNG must resume too
    whole, _, _ = launch(tmp_path, "whole", *args)
    ckpt = str(tmp_path / "ckpt")
    log = tmp_path / "part.jsonl"
    launch(tmp_path, "part1", *args, "--steps", "5", "--checkpoint-dir", ckpt, log=log)
    part, _, done = launch(tmp_path, "part2", *args, "--checkpoint-dir", ckpt, "--resume", log=log)
    assert "resumed from" in done.stdout
    assert losses(part) == losses(whole) and len(losses(whole)) == 16

    with pytest.raises(SystemExit) as exit_:
        train.main([*args, "--checkpoint-dir", ckpt, "--resume"])
    assert exit_.value.code == 2 and "world_size=2 (now 1)" in capsys.readouterr().err
