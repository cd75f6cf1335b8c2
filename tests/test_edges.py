"""Each kind of edge, checked where it lives and with several cases of its kind: signals
(training/stops.py), paths (training/paths.py), a checkpoint folder's own files
(training/checkpoint.py), numbers (training/options.py and the optimizer files), options that cannot
take effect (training/options.py), failures from outside (training/stops.py), ids of sparse updates
(adagrad_sparse.py). Every case: one line, its exit code, and every file a user had unchanged."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import train
from adagrad import Adagrad
from adagrad_da import AdagradDA
from adagrad_sparse import SparseAdagrad, SparseEmbedding, lookup_rows
from tests.test_faults import SMALL, fails, read_log, run_cli, snapshot, wait_for_lines
from tests.test_lm import make_text
from tests.test_mnist import write_small_mnist
from training import checkpoint, stops


@pytest.fixture
def data(tmp_path):
    write_small_mnist(tmp_path / "data")
    return tmp_path / "data"


def one_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------
# Signals: every one that would end the process takes the stop path


def stop_while_training(tmp_path, data, send, env=None):
    """Start a checkpointed run in its own process group, let it train, `send(process)`; return
    (exit code, its one line, the checkpoint folder)."""
    ckpt, log = tmp_path / "ckpt", tmp_path / "run.jsonl"
    args = ["--data-dir", str(data), *SMALL, "--epochs", "50", "--checkpoint-dir", str(ckpt), "--log-file", str(log)]
    process = run_cli(args, start_new_session=True, env=env)
    assert wait_for_lines(log, 6, process), process.communicate()
    send(process)
    _, err = process.communicate(timeout=120)
    return process.returncode, one_line(err), ckpt


STOP_SIGNALS = [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGALRM, signal.SIGXCPU]


@pytest.mark.parametrize("stop", STOP_SIGNALS, ids=[s.name for s in STOP_SIGNALS])
def test_every_terminating_signal_saves_and_says_how_to_continue(tmp_path, data, stop):
    code, line, ckpt = stop_while_training(tmp_path, data, lambda p: p.send_signal(stop))
    step = json.loads((ckpt / "checkpoint.json").read_text())["step"]
    assert code == 128 + stop
    assert line.startswith(f"train.py: stopped by {stop.name} at step {step}; saved step {step} in {ckpt}"), line
    assert line.endswith("--resume"), line


@pytest.mark.parametrize(
    "how",
    [
        lambda p: [p.send_signal(signal.SIGINT), time.sleep(0.05), p.send_signal(signal.SIGINT)],
        lambda p: [p.send_signal(signal.SIGTERM), p.send_signal(signal.SIGINT), p.send_signal(signal.SIGHUP)],
        lambda p: os.killpg(p.pid, signal.SIGINT),  # a terminal's Ctrl-C reaches the whole group
    ],
    ids=["a second Ctrl-C", "three signals at once", "Ctrl-C to the process group"],
)
def test_signals_that_come_together_stop_once_through_the_stop_path(tmp_path, data, how):
    code, line, ckpt = stop_while_training(tmp_path, data, how)
    step = json.loads((ckpt / "checkpoint.json").read_text())["step"]
    assert code in (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP)  # the first to arrive
    assert f"at step {step}; saved step {step} in {ckpt}: continue with " in line, line


@pytest.mark.parametrize("tuning", ["on", "off"])
def test_a_group_signal_while_kernels_are_built_leaves_no_half_built_kernel(tmp_path, data, tuning):
    """A fresh kernel cache (a new $HOME for the tuned kernels, a new $TMPDIR for MLX's own), and Ctrl-C to the
    whole group while mx.compile builds the first step's kernels with g++."""
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    env = os.environ | {"HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"), "PYTHONUNBUFFERED": "1"}
    args = ["--data-dir", str(data), *SMALL, "--cpu-tuning", tuning, "--checkpoint-dir", str(tmp_path / "ckpt")]
    process = run_cli(args, start_new_session=True, env=env)
    while not process.stdout.readline().startswith("adagrad:"):  # the model is built: compiling comes next
        assert process.poll() is None, process.communicate()
    time.sleep(0.3)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT and one_line(err).startswith("train.py: stopped by SIGINT"), err
    kernels = list((tmp_path / "home").rglob("*.so")) + list((tmp_path / "tmp").rglob("*.so"))
    assert kernels and all(stops.whole_elf(k) for k in kernels), [k for k in kernels if not stops.whole_elf(k)]
    again = run_cli([*args, "--steps", "2", *(["--resume"] if (tmp_path / "ckpt/checkpoint.json").exists() else [])],
                    env=env)  # fmt: skip
    assert again.wait(timeout=300) == 0, again.communicate()


# ---------------------------------------------------------------------------------------
# Paths: one door, before any work


def path_cases(tmp):
    """(arguments, a fragment of the one line) for faults of every kind of path, laid out in `tmp`."""
    os.mkfifo(tmp / "fifo")
    (tmp / "folder").mkdir()
    (tmp / "file").write_text("x")
    (tmp / "corpus.txt").write_text(make_text())
    (tmp / "other").mkdir()
    (tmp / "other" / "checkpoint.safetensors").write_bytes(b"another run's")
    (tmp / "link").symlink_to(tmp / "other" / "checkpoint.json")
    return [
        (["--log-file", f"{tmp}/fifo"], f"--log-file {tmp}/fifo is a FIFO, not a file"),
        (["--log-file", f"{tmp}/folder"], f"--log-file {tmp}/folder is a folder, not a file"),
        (["--log-file", "/dev/null"], "--log-file /dev/null is a device, not a file"),
        (
            ["--log-file", f"{tmp}/file/run.jsonl"],
            f"--log-file {tmp}/file/run.jsonl: {tmp}/file is a file, not a folder",
        ),
        (["--log-file", f"{tmp}/{'a' * 300}"], "is 300 bytes, longer than the 255 its filesystem takes"),
        (["--log-file", "/".join([str(tmp), *["b" * 200] * 25])], "bytes a path may have"),
        (["--log-file", f"{tmp}/link"], "would write over a checkpoint folder's files"),
        (["--log-file", f"{tmp}/other/run.jsonl"], "would write over a checkpoint folder's files"),
        (["--checkpoint-dir", f"{tmp}/file"], f"--checkpoint-dir {tmp}/file is a file, not a folder"),
        (["--checkpoint-dir", f"{tmp}/fifo"], f"--checkpoint-dir {tmp}/fifo is a FIFO, not a folder"),
        (["--checkpoint-dir", f"{tmp}/file/deeper/ckpt"], f"{tmp}/file is a file, not a folder"),
        (["--checkpoint-dir", f"{tmp}/{'c' * 256}"], "is 256 bytes, longer than the 255"),
        (["--data-dir", f"{tmp}/file"], f"--data-dir {tmp}/file is a file, not a folder"),
        (["--task", "lm", "--dataset", f"{tmp}/fifo"], f"--dataset {tmp}/fifo is a FIFO, not a text file or folder"),
        (["--task", "lm", "--dataset", f"{tmp}/corpus.txt", "--cache-dir", f"{tmp}/file"], "--cache-dir"),
        (["--reproduce", f"{tmp}/folder"], f"--reproduce {tmp}/folder is a folder, not a file"),
        (["--reproduce", f"{tmp}/fifo"], f"--reproduce {tmp}/fifo is a FIFO, not a file"),
        (
            ["--log-file", f"{tmp}/run", "--checkpoint-dir", f"{tmp}/run"],
            f"--log-file {tmp}/run is the --checkpoint-dir",
        ),
    ]


@pytest.mark.parametrize("case", range(18))
def test_every_path_is_checked_before_any_work(tmp_path, data, capsys, case):
    args, message = path_cases(tmp_path)[case]
    before = snapshot(tmp_path)
    start = ["--data-dir", str(data), "--verify-data", "off"] if "--data-dir" not in args else []
    error = fails(capsys, [*start, *args])
    assert message in error, error
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("HOME", "relative/home", "$HOME is 'relative/home', not an absolute path"),
        ("HOME", "", "$HOME is '', not an absolute path"),
        ("TMPDIR", "{tmp}/missing", "$TMPDIR is {tmp}/missing, which is not an existing folder"),
        ("TMPDIR", "{tmp}/data/train-images-idx3-ubyte.gz", "which is not an existing folder"),
    ],
)
def test_the_folders_of_the_environment_are_checked_too(tmp_path, data, capsys, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value.replace("{tmp}", str(tmp_path)))
    before = snapshot(tmp_path)
    error = fails(capsys, ["--data-dir", str(data), *SMALL])
    assert message.replace("{tmp}", str(tmp_path)) in error and f"set {name} to an existing folder" in error, error
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("removed", ["log", "checkpoint folder"])
def test_an_output_removed_while_the_run_goes_is_said_as_it_is(tmp_path, data, capsys, monkeypatch, removed):
    ckpt, log = tmp_path / "ckpt", tmp_path / "run.jsonl"
    take_step = train.take_step

    def remove_at_step_5(run, state, batch):
        take_step(run, state, batch)
        if state.step == 5:
            shutil.rmtree(ckpt) if removed == "checkpoint folder" else log.unlink()

    monkeypatch.setattr(train, "take_step", remove_at_step_5)
    argv = ["--data-dir", str(data), *SMALL, "--checkpoint-dir", str(ckpt), "--log-file", str(log)]
    error = fails(capsys, [*argv, "--checkpoint-every", "8"])
    if removed == "log":  # the training is not lost with it: saved, and --resume continues into a new log
        assert f"--log-file {log} was removed while the run was going" in error and "saved step 5" in error, error
        monkeypatch.setattr(train, "take_step", take_step)
        train.main([*argv, "--checkpoint-every", "8", "--steps", "9", "--resume"])
        assert read_log(log)[-1]["step"] == 9
    else:
        assert "the folder was removed while the run was going, and no checkpoint is left" in error, error
        assert "intact" not in error


# ---------------------------------------------------------------------------------------
# A run writes only files it owns


def test_a_checkpoint_folder_with_a_users_files_is_refused_and_overwrite_keeps_them(tmp_path, data, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("mine")
    (ckpt / ".checkpoint.tmp-mine").write_text("also mine")  # close to, but not, a name this program uses
    base = ["--data-dir", str(data), *SMALL, "--steps", "2", "--checkpoint-dir", str(ckpt)]
    before = snapshot(tmp_path)
    error = fails(capsys, base)
    assert "holds files this program did not write (.checkpoint.tmp-mine, notes.txt)" in error, error
    assert snapshot(tmp_path) == before
    train.main([*base, "--overwrite"])
    train.main([*base, "--overwrite"])  # and again, over its own checkpoint
    assert (ckpt / "notes.txt").read_text() == "mine" and (ckpt / ".checkpoint.tmp-mine").read_text() == "also mine"


def test_a_log_kept_in_its_own_checkpoint_folder_is_the_runs(tmp_path, data):
    ckpt = tmp_path / "ckpt"
    base = ["--data-dir", str(data), *SMALL, "--checkpoint-dir", str(ckpt), "--log-file", str(ckpt / "run.jsonl")]
    train.main([*base, "--steps", "2"])
    train.main([*base, "--steps", "4", "--resume"])
    assert read_log(ckpt / "run.jsonl")[-1]["step"] == 4


# ---------------------------------------------------------------------------------------
# Numbers, in the dtype MLX uses; options that cannot take effect


OPTION_CASES = [
    (["--lr", "1e39"], "--lr must be finite in float32 (at most 3.4e+38), got 1e39"),
    (["--lr", "1e-46"], "--lr is 0 or subnormal in float32, MLX's dtype: use at least 1.18e-38"),
    (["--eps", "1e-40"], "--eps is 0 or subnormal in float32"),
    (["--eps", "2"], "--eps must be in (0, 1], got 2"),
    (["--l2", "1e-41"], "--l2 is 0 or subnormal in float32, MLX's dtype: use 0 or at least"),
    (["--l1", "3e38"], "--l1 must be in [0, 10], got 3e38"),
    (["--weight-decay", "1e39"], "--weight-decay must be finite in float32"),
    (["--weight-decay", "11"], "--weight-decay must be in [0, 10]"),
    (["--initial-accumulator-value", "3e38"], "--initial-accumulator-value must be in [0, 1000000.0]"),
    (["--lr-decay", "2"], "--lr-decay must be in [0, 1]"),
    (["--task", "lm", "--sample", "5", "--temperature", "1e-30"], "--temperature must be in [0.01, 100]"),
    (["--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint-dir, without which it does nothing"),
    (["--overwrite"], "--overwrite needs --checkpoint-dir or --log-file"),
    (["--reproduce-steps", "5"], "--reproduce-steps needs --reproduce"),
    (["--task", "lm", "--temperature", "0.5"], "--temperature needs --sample"),
    (["--cpu-tuning", "off", "--blas-threads", "2"], "--blas-threads is an option of --cpu-tuning on, not off"),
    (["--task", "lm", "--tokenizer", "word", "--cache-dir", "x"], "--cache-dir is an option of --tokenizer bpe or"),
    (["--reproduce", "curves/mnist_mlp_adagrad.jsonl", "--lr", "0.1"], "--lr does nothing with --reproduce"),
    (["--reproduce", "curves/mnist_mlp_adagrad.jsonl", "--epochs", "3"], "--epochs does nothing with --reproduce"),
]


@pytest.mark.parametrize("args, message", OPTION_CASES, ids=[" ".join(a) for a, _ in OPTION_CASES])
def test_numbers_and_options_that_cannot_work_are_one_line(tmp_path, data, capsys, monkeypatch, args, message):
    monkeypatch.chdir(Path(train.__file__).parent)
    before = snapshot(tmp_path)
    error = fails(capsys, ["--data-dir", str(data), *args])
    assert message in error, error
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("make", [Adagrad, AdagradDA])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"learning_rate": 1e39}, "learning_rate must be finite in mlx.core.float32"),
        ({"learning_rate": mx.array(float("inf"))}, "learning_rate must be finite"),
        ({"eps": 1e-50}, "is 0 in the state's dtype"),
        ({"l2": 1e39}, "l2 must be finite in mlx.core.float32"),
        ({"l1": float("nan")}, "l1 must be finite"),
        ({"state_dtype": mx.float16, "eps": 1e-4, "l1": 7e4}, "l1 must be finite in mlx.core.float16"),
        ({"state_dtype": "float32"}, "state_dtype must be a floating dtype"),
    ],
)
def test_the_optimizer_files_check_each_value_in_the_dtypes_they_compute_in(make, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**{"learning_rate": 0.1, **kwargs})


@pytest.mark.parametrize("make", [Adagrad, AdagradDA])
def test_the_optimizer_files_refuse_values_of_the_wrong_type_by_name(make):
    for name, value in [("learning_rate", "0.1"), ("eps", None), ("l1", [0.1]), ("l2", True)]:
        with pytest.raises(TypeError, match=f"{make.__name__} {name} must be a number"):
            make(**{"learning_rate": 0.1, name: value})


@pytest.mark.parametrize("learning_rate", [mx.array(0.05), mx.array([0.05]), np.float32(0.05), -0.05, 1])
def test_adagrad_takes_every_learning_rate_mlx_takes_with_the_same_bits(learning_rate):
    model, weights = nn.Linear(4, 3), {}
    mx.eval(model.parameters())
    start = model.parameters()
    for make in (optim.Adagrad, Adagrad):
        model.update(start)
        optimizer = make(learning_rate)
        for step in range(3):
            grads = {k: mx.sin(v * (step + 1)) for k, v in tree_flatten(model.parameters())}
            optimizer.update(model, tree_unflatten(list(grads.items())))
        weights[make] = dict(tree_flatten(model.parameters()))
    for key, value in weights[Adagrad].items():
        assert mx.array_equal(value, weights[optim.Adagrad][key]).item(), key


@pytest.mark.parametrize("make", [Adagrad, AdagradDA])
def test_integer_parameters_are_refused_by_name(make):
    params = {"layer": {"weight": mx.zeros((2, 2)), "index": mx.array([1, 2], mx.int32)}}
    with pytest.raises(TypeError, match="cannot train layer.index: it is mlx.core.int32"):
        make(0.1).init(params)


# ---------------------------------------------------------------------------------------
# Failures from outside


@pytest.mark.parametrize("closed", [">&-", "2>&-", "<&-", ">&- 2>&- <&-"])
def test_a_run_whose_standard_streams_are_closed_trains_and_logs(tmp_path, data, closed):
    log = tmp_path / "run.jsonl"
    command = f"exec {sys.executable} train.py --data-dir '{data}' {' '.join(SMALL)} --steps 4 --log-file '{log}'"
    done = subprocess.run(["sh", "-c", f"{command} {closed}"], cwd=Path(train.__file__).parent, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert read_log(log)[-1]["step"] == 4


def test_a_standard_output_that_cannot_be_written_is_one_line(tmp_path, data):
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "train.py", "--data-dir", str(data), *SMALL, "--steps", "4"],
            cwd=Path(train.__file__).parent, stdout=full, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    line = one_line(done.stderr)
    assert done.returncode == 2 and "standard output cannot be written (No space left on device)" in line, line


def test_damaged_kernels_in_mlxs_cache_are_rebuilt_before_they_are_loaded(tmp_path, data):
    env = os.environ | {"TMPDIR": str(tmp_path), "MLX_ADAGRAD_CPU_TUNING": "off"}  # MLX's own cache, in tmp_path
    args = [sys.executable, "train.py", "--data-dir", str(data), *SMALL, "--steps", "2"]
    root = Path(train.__file__).parent
    assert subprocess.run(args, cwd=root, env=env, capture_output=True).returncode == 0
    kernels = sorted(tmp_path.rglob("*.so"))
    assert kernels, "mx.compile built no kernel"
    for index, kernel in enumerate(kernels):  # empty, cut short, not a library at all
        damaged = [b"", kernel.read_bytes()[: kernel.stat().st_size // 2], b"not ELF" * 100][index % 3]
        kernel.write_bytes(damaged)
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all(stops.whole_elf(k) for k in tmp_path.rglob("*.so"))


@pytest.mark.parametrize(
    "error, message",
    [
        (MemoryError(), "out of memory: close other programs, or use a smaller --batch-size"),
        (OSError(errno.ENOSPC, "No space left on device", "/data/x"), "cannot use /data/x (No space left on device)"),
        (RuntimeError("[Compile::eval_cpu] Failed to compile function f: g++ not found"), "mx.compile could not"),
        (RuntimeError("[malloc] Unable to allocate 1000000 bytes"), "out of memory ([malloc] Unable to allocate"),
    ],
    ids=["MemoryError", "full disk", "compiler", "MLX allocation"],
)
def test_failures_from_outside_are_one_line_naming_the_last_checkpoint(tmp_path, data, capsys, monkeypatch, error,
                                                                       message):  # fmt: skip
    ckpt = tmp_path / "ckpt"
    base = ["--data-dir", str(data), *SMALL, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]
    take_step = train.take_step

    def fails_at_step_3(run, state, batch):
        if state.step == 3:
            raise error
        take_step(run, state, batch)

    monkeypatch.setattr(train, "take_step", fails_at_step_3)
    line = fails(capsys, base)
    assert message in line, line
    assert "the last good checkpoint (step 2)" in line and "--resume" in line, line


# ---------------------------------------------------------------------------------------
# Sparse updates: ids of every integer dtype, never outside the table


def sparse_setup():
    mx.random.seed(0)
    table = SparseEmbedding(6, 4)
    mx.eval(table.parameters())
    optimizer = SparseAdagrad(0.1)
    optimizer.init({})
    return table, optimizer


@pytest.mark.parametrize("dtype", [mx.uint8, mx.uint16, mx.uint32, mx.uint64, mx.int8, mx.int16, mx.int64])
def test_row_ids_of_any_integer_dtype_update_as_int32_ids_do(dtype):
    results = []
    for kind in (mx.int32, dtype):
        table, optimizer = sparse_setup()
        optimizer.update(table, {})
        ids = mx.array([1, 3, 1, 5], kind)
        optimizer.update_rows(table, "weight", ids, mx.ones((4, 4)))
        results.append((table.weight, table(ids)))
    assert mx.array_equal(results[0][0], results[1][0]).item() and mx.array_equal(results[0][1], results[1][1]).item()


def test_an_empty_batch_of_ids_changes_nothing_and_float_ids_are_refused():
    table, optimizer = sparse_setup()
    before = mx.array(table.weight)
    optimizer.update(table, {})
    optimizer.update_rows(table, "weight", mx.array([], mx.int32), mx.zeros((0, 4)))
    assert mx.array_equal(table.weight, before).item()
    with pytest.raises(TypeError, match="ids must be integers, got mlx.core.float32"):
        optimizer.update_rows(table, "weight", mx.array([1.0]), mx.ones((1, 4)))


def test_a_lookup_never_reads_outside_the_table():
    table, _ = sparse_setup()
    with pytest.raises(IndexError, match="id 6 is outside the table's 6 rows"):
        table(mx.array([0, 6]))
    with pytest.raises(IndexError, match="id 300 is outside"):
        table(mx.array([300], mx.uint16))
    looked_up = mx.compile(table)(mx.array([[2, 10**6], [-1, -7]]))  # traced: ids cannot be read, so masked
    assert looked_up.shape == (2, 2, 4)
    assert mx.array_equal(looked_up[0, 0], table.weight[2]).item() and mx.array_equal(looked_up[1, 0], table.weight[5])
    assert all(any(mx.array_equal(row, r).item() for r in table.weight) for row in looked_up.reshape(-1, 4))


class OneTable(nn.Module):
    """adagrad_sparse.SparseInputs with one input table, whose rows are the tokens."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(6, 4)

    def input_tables(self):
        return ["embedding.weight"]

    def input_ids(self, tokens):
        return {"embedding.weight": tokens}


def test_init_rows_freezes_the_table_and_lookup_rows_never_reads_outside_it():
    model, optimizer = OneTable(), SparseAdagrad(0.1)
    optimizer.init_rows(model, "embedding.weight")
    optimizer.init(model.trainable_parameters())
    assert tree_flatten(model.trainable_parameters()) == []  # its gradient comes as rows, not densely
    assert optimizer.state["embedding"]["weight"]["v"].shape == (6, 4)
    with pytest.raises(IndexError, match="lookup_rows: id 6 is outside the table's 6 rows"):
        lookup_rows(model, model.input_ids(mx.array([0, 6])))
    (rows,) = mx.compile(lambda ids: lookup_rows(model, model.input_ids(ids)))(mx.array([[2, 10**6], [-1, -7]]))
    weight = model.embedding.weight
    assert rows.shape == (2, 2, 4)  # traced: ids cannot be read, so those outside read a row inside
    assert mx.array_equal(rows[0, 0], weight[2]).item() and mx.array_equal(rows[1, 0], weight[5]).item()
    assert all(any(mx.array_equal(row, r).item() for r in weight) for row in rows.reshape(-1, 4))


def test_checkpoint_module_reads_a_header_before_allocating(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(checkpoint.CheckpointError, match="outside the file or at the wrong size"):
        checkpoint.read(path)
