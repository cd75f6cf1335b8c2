"""Faults and bad input, as a careful user or a flaky machine meets them: every case ends in one clear
line and exit 2 (or a clean interrupt), and leaves the data, checkpoint and log files as they were.
An interrupted run, killed with SIGKILL or stopped with Ctrl-C, resumes to the uninterrupted run's
log, line for line but for timings, and its weights, bit for bit."""

import errno
import fcntl
import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

import train
from tests.test_lm import make_text
from tests.test_mnist import write_small_mnist
from training import checkpoint
from training.checkpoint import RunState

REPO = Path(__file__).parents[1]
SMALL = ["--batch-size", "32", "--epochs", "2", "--log-every", "1", "--verify-data", "off"]
TIMINGS = {"samples_per_s", "tokens_per_s", "elapsed_s"}


def snapshot(*folders):
    """{path: sha256} of every file under `folders`: what a failed run must leave as it was."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in folders
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def fails(capsys, argv):
    """Run train.main(argv), which must exit 2 with exactly one line on stderr; return that line."""
    capsys.readouterr()  # what ran before
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    shown = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]  # as a terminal shows it
    err = [line for line in shown if line.strip()]
    assert exit_.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("train.py: error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture
def mnist_dir(tmp_path):
    write_small_mnist(tmp_path / "data")
    return tmp_path / "data"


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------------------
# Never lose a run


def test_a_fresh_run_never_overwrites_a_checkpoint_or_a_log(tmp_path, mnist_dir, capsys):
    ckpt, log = tmp_path / "ckpt", tmp_path / "run.jsonl"
    base = ["--data-dir", str(mnist_dir), *SMALL, "--steps", "3"]
    train.main([*base, "--checkpoint-dir", str(ckpt), "--log-file", str(log)])
    before = snapshot(ckpt, tmp_path / "run.jsonl")
    error = fails(capsys, [*base, "--checkpoint-dir", str(ckpt)])
    assert "holds a checkpoint: continue it with --resume" in error and "--overwrite" in error
    error = fails(capsys, [*base, "--log-file", str(log)])
    assert "exists: continue its run with --resume" in error and "--overwrite" in error
    assert snapshot(ckpt, tmp_path / "run.jsonl") == before
    train.main([*base, "--steps", "2", "--checkpoint-dir", str(ckpt), "--log-file", str(log), "--overwrite"])
    assert json.loads((ckpt / "checkpoint.json").read_text())["step"] == 2 and len(read_log(log)) == 1 + 2 + 1


def test_two_runs_cannot_share_a_checkpoint_folder(tmp_path, mnist_dir, capsys):
    ckpt = tmp_path / "ckpt"
    held = checkpoint.claim(ckpt, resume=False, overwrite=False)  # another run holds the folder
    error = fails(capsys, ["--data-dir", str(mnist_dir), *SMALL, "--checkpoint-dir", str(ckpt)])
    assert "is in use by another train.py (pid" in error and not (ckpt / "checkpoint.safetensors").exists()
    held.close()  # the lock goes with the process or its file, so a killed run never leaves it stuck
    train.main(["--data-dir", str(mnist_dir), *SMALL, "--steps", "2", "--checkpoint-dir", str(ckpt)])


@pytest.mark.parametrize("which", ["--log-file", "--checkpoint-dir"])
def test_an_output_that_cannot_be_written_is_refused_before_training(tmp_path, mnist_dir, capsys, which):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    start = time.perf_counter()
    error = fails(capsys, ["--data-dir", str(mnist_dir), *SMALL, which, str(blocker / "inside")])
    assert f"{which} {blocker / 'inside'}: {blocker} is a file, not a folder" in error
    assert time.perf_counter() - start < 10 and blocker.read_text() == "not a folder"


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_temporary_files(tmp_path, mnist_dir, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    base = ["--data-dir", str(mnist_dir), *SMALL, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]
    train.main([*base, "--steps", "2"])
    before = snapshot(ckpt)
    real_save = mx.save_safetensors

    def full(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")  # what a full disk leaves: part of a file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full)
    error = fails(capsys, [*base, "--resume", "--steps", "4"])
    assert "cannot write a checkpoint" in error and "No space left on device" in error and "intact" in error
    monkeypatch.setattr(mx, "save_safetensors", real_save)
    after = snapshot(ckpt)
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == {
        k: v for k, v in before.items() if not k.endswith(".lock")
    }


def test_a_full_disk_under_the_log_leaves_no_half_line(tmp_path, mnist_dir, capsys, monkeypatch):
    from training import runlog

    class FullDisk:  # what a full disk does to an unbuffered write: part of it lands
        def __init__(self, file):
            self.file, self.writes = file, 0

        def write(self, data):
            self.writes += 1
            if self.writes < 4:
                return self.file.write(data)
            self.file.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(runlog, "open", lambda *args, **kwargs: FullDisk(open(*args, **kwargs)), raising=False)
    log = tmp_path / "run.jsonl"
    error = fails(capsys, ["--data-dir", str(mnist_dir), *SMALL, "--log-file", str(log)])
    assert f"cannot write --log-file {log} (No space left on device)" in error
    assert len(read_log(log)) == 3 and log.read_bytes().endswith(b"\n")  # whole records only


@pytest.mark.parametrize("lr", ["inf", "nan", "1e6"])
def test_a_diverging_run_stops_and_never_saves_what_diverged(tmp_path, mnist_dir, capsys, lr):
    ckpt = tmp_path / "ckpt"
    argv = ["--data-dir", str(mnist_dir), *SMALL, "--optimizer", "sgd", "--checkpoint-dir", str(ckpt)]
    if lr != "1e6":
        assert f"--lr must be a finite number, got {lr}" in fails(capsys, [*argv, "--lr", lr])
        return
    train.main([*argv, "--lr", "0.05", "--steps", "3", "--checkpoint-every", "1"])
    error = fails(capsys, [*argv, "--lr", lr, "--checkpoint-every", "1", "--overwrite"])
    assert "training diverged" in error and "the last good checkpoint" in error
    saved = mx.load(str(ckpt / "checkpoint.safetensors"))
    assert checkpoint.all_finite(saved.values())


def test_a_checkpoint_with_edited_metadata_is_not_ours(tmp_path, mnist_dir, capsys):
    ckpt = tmp_path / "ckpt"
    base = ["--data-dir", str(mnist_dir), *SMALL, "--checkpoint-dir", str(ckpt)]
    train.main([*base, "--steps", "2"])
    arrays, metadata = mx.load(str(ckpt / "checkpoint.safetensors"), return_metadata=True)
    for run_state in ['{"format": 2}', '{"format": 2, "step": "two", "epoch": 0, "batch": 2, "config": {}}', "[1]"]:
        mx.save_safetensors(str(ckpt / "checkpoint.safetensors"), arrays, metadata={"run_state": run_state})
        assert "is not a checkpoint of this program" in fails(capsys, [*base, "--resume"])
    mx.save_safetensors(str(ckpt / "checkpoint.safetensors"), arrays)  # no metadata at all
    assert "is not a checkpoint of this program" in fails(capsys, [*base, "--resume"])


# ---------------------------------------------------------------------------------------
# Data in odd shapes


def test_idx_files_that_hold_no_items_are_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    write_small_mnist(data)
    empty = gzip.compress((2051).to_bytes(4, "big") + (0).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
    (data / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(empty)
    error = fails(capsys, ["--data-dir", str(data), *SMALL])
    assert "train-images-idx3-ubyte.gz holds no images" in error


def test_text_on_one_very_long_line_trains(tmp_path, capsys):
    """SentencePiece skips sentences over 4192 bytes: the trainer gets the line in pieces."""
    corpus = tmp_path / "one-line.txt"
    corpus.write_text(make_text().replace("\n", " "))
    train.main(["--task", "lm", "--dataset", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--vocab-size",
                "300", "--dim", "32", "--layers", "1", "--context", "16", "--steps", "2"])  # fmt: skip
    assert "epoch 1: step 2" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# A run's log is its own


def test_two_runs_never_write_one_log(tmp_path, mnist_dir, capsys):
    log = tmp_path / "run.jsonl"
    with open(log, "ab") as held:  # another train.py holds the log
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        error = fails(capsys, ["--data-dir", str(mnist_dir), *SMALL, "--log-file", str(log), "--overwrite"])
    assert f"--log-file {log} is in use by another train.py" in error and log.read_bytes() == b""


def test_a_redo_refused_for_its_log_keeps_the_old_checkpoint(tmp_path, mnist_dir, capsys):
    ckpt, log = tmp_path / "ckpt", tmp_path / "run.jsonl"
    base = ["--data-dir", str(mnist_dir), *SMALL, "--checkpoint-dir", str(ckpt), "--log-file", str(log)]
    train.main([*base, "--steps", "2"])
    before = snapshot(ckpt)
    with open(log, "ab") as held:  # another train.py holds the log
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "is in use by another train.py" in fails(capsys, [*base, "--overwrite"])
    assert snapshot(ckpt) == before  # --overwrite retires the checkpoint only once both outputs are its own


def test_resume_continues_only_its_own_runs_log(tmp_path, mnist_dir, capsys):
    base = ["--data-dir", str(mnist_dir), *SMALL, "--steps", "3"]
    ours, other = tmp_path / "ours.jsonl", tmp_path / "other.jsonl"
    train.main([*base, "--checkpoint-dir", str(tmp_path / "ckpt"), "--log-file", str(ours)])
    train.main([*base, "--log-file", str(other)])  # another run's log, longer than the checkpoint's
    before = snapshot(tmp_path)
    error = fails(capsys, [*base, "--steps", "5", "--checkpoint-dir", str(tmp_path / "ckpt"), "--log-file",
                           str(other), "--resume"])  # fmt: skip
    assert f"--log-file {other} is not the log of the run in --checkpoint-dir" in error
    assert snapshot(tmp_path) == before
    train.main([*base, "--steps", "5", "--checkpoint-dir", str(tmp_path / "ckpt"), "--log-file", str(ours), "--resume"])
    header = read_log(ours)[0]
    assert header["run_id"] == json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())["run_id"]


# ---------------------------------------------------------------------------------------
# A checkpoint proves itself


def damage(ckpt, how):
    """Damage DIR/checkpoint.safetensors as `how` says; a checkpoint of the tests' small MLP."""
    path = ckpt / "checkpoint.safetensors"
    raw = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:header_end])
    if how == "random bytes":
        raw[header_end + 100 : header_end + 164] = random.Random(0).randbytes(64)
    elif how == "a zeroed block":
        raw[-4096:] = bytes(4096)
    elif how == "cut short":
        raw = raw[: len(raw) // 2]
    elif how == "a header that lies":  # an array claimed to reach past the end of the file
        name = next(k for k in header if k != "__metadata__")
        start, _ = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start, start + 10**9]
        header[name]["shape"] = [10**9 // 4]
        text = json.dumps(header).encode()
        raw = bytearray(len(text).to_bytes(8, "little")) + text + raw[header_end:]
    elif how == "a header of impossible size":
        raw[:8] = (2**60).to_bytes(8, "little")
    elif how == "an array of the wrong size":  # a shape that does not match its bytes
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [2 * d for d in header[name]["shape"]]
        text = json.dumps(header).encode()
        raw = bytearray(len(text).to_bytes(8, "little")) + text + raw[header_end:]
    elif how in ("an edited run state", "an older format, not finite"):
        arrays, metadata = mx.load(str(path), return_metadata=True)
        run_state = json.loads(metadata["run_state"])
        if how == "an edited run state":  # arrays and their checksums intact
            metadata["run_state"] = json.dumps({**run_state, "step": run_state["step"] + 5}, indent=1, sort_keys=True)
        else:  # format 2 stored no checksums: its arrays are checked finite instead
            arrays["model.head.weight"] = mx.full(arrays["model.head.weight"].shape, float("nan"))
            metadata = {"run_state": json.dumps({**run_state, "format": 2}, indent=1, sort_keys=True)}
        mx.save_safetensors(str(path), arrays, metadata=metadata)
        return
    else:  # arrays re-saved consistently, checksums and all, but not this model's
        arrays, metadata = mx.load(str(path), return_metadata=True)
        name = "model.head.weight"
        if how == "a missing array":
            del arrays[name]
        elif how == "a wrong shape":
            arrays[name] = arrays[name][:, :5]
        elif how == "a wrong dtype":
            arrays[name] = arrays[name].astype(mx.float16)
        sums = {k: checkpoint.checksum(v) for k, v in arrays.items()}
        mx.save_safetensors(str(path), arrays, metadata={**metadata, "checksums": json.dumps(sums)})
        return
    path.write_bytes(bytes(raw))


BYTES_DAMAGED = ["random bytes", "a zeroed block", "cut short", "a header that lies", "a header of impossible size",
                 "an array of the wrong size", "an edited run state", "an older format, not finite"]  # fmt: skip
DAMAGE = [*BYTES_DAMAGED, "a missing array", "a wrong shape", "a wrong dtype"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_checkpoint_is_one_line_and_never_loaded(tmp_path, mnist_dir, capsys, how):
    ckpt = tmp_path / "ckpt"
    base = ["--data-dir", str(mnist_dir), *SMALL, "--checkpoint-dir", str(ckpt)]
    train.main([*base, "--steps", "3"])
    damage(ckpt, how)
    before = snapshot(tmp_path)
    error = fails(capsys, [*base, "--steps", "6", "--resume"])
    assert str(ckpt / "checkpoint.safetensors") in error, error
    assert snapshot(tmp_path) == before
    if how in BYTES_DAMAGED:  # never called the last good checkpoint
        assert checkpoint.last_good(ckpt) == ""
    train.main([*base, "--steps", "2", "--overwrite"])  # starts over, whatever the old one holds
    assert json.loads((ckpt / "checkpoint.json").read_text())["step"] == 2


def test_overwrite_retires_the_old_checkpoint_before_training(tmp_path, mnist_dir, capsys):
    ckpt, log = tmp_path / "ckpt", tmp_path / "run.jsonl"
    base = ["--data-dir", str(mnist_dir), *SMALL, "--checkpoint-dir", str(ckpt), "--log-file", str(log)]
    train.main([*base, "--steps", "3"])
    # A redo that dies before its first checkpoint (here: on a bad --lr for its optimizer)...
    fails(capsys, [*base, "--overwrite", "--optimizer", "sgd", "--lr", "1e6", "--checkpoint-every", "100"])
    # ...leaves nothing that --resume could continue into the new log.
    assert "no checkpoint in" in fails(capsys, [*base, "--resume"])


# ---------------------------------------------------------------------------------------
# A resume continues the same training


def test_a_resume_on_edited_data_is_refused(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text())
    ckpt = tmp_path / "ckpt"
    base = ["--task", "lm", "--dataset", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--vocab-size", "300",
            "--dim", "32", "--layers", "1", "--context", "16", "--checkpoint-dir", str(ckpt)]  # fmt: skip
    train.main([*base, "--steps", "2"])
    corpus.write_text(make_text().replace("the", "thy"))  # same path, other text
    error = fails(capsys, [*base, "--steps", "4", "--resume"])
    assert "was trained on other data (data_sha256, tokenizer_sha256 differ" in error, error


# ---------------------------------------------------------------------------------------
# Bad input


CORPUS = [  # (arguments after --data-dir, a fragment of the one line they must give)
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--eps", "inf"], "--eps must be a finite number"),
    (["--epochs", "0"], "--epochs must be in [1, 100000]"),
    (["--steps", "-3"], "--steps must be > 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--log-every", "0"], "--log-every must be > 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be > 0"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--augment-shift", "-2"], "--augment-shift must be >= 0"),
    (["--blas-threads", "0"], "--blas-threads must be > 0"),
    (
        ["--weight-decay", "0.1", "--optimizer", "adam"],
        "--weight-decay is an option of --optimizer adagrad, sgd or adamw, not adam",
    ),
    (["--lr-decay", "0.1", "--optimizer", "sgd"], "is an option of --optimizer adagrad"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--momentum", "0.99999999"], "--momentum must be in [0, 1), got 0.99999999, 1 in float32"),
    (["--dropout", "0.999999999"], "--dropout must be in [0, 1), got 0.999999999, 1 in float32"),
    (["--momentum", "0.9", "--optimizer", "sgd"], "--momentum is an option of --optimizer adagrad"),
    (["--momentum", "0.9", "--l1", "0.1"], "--momentum has no proximal or sparse step"),
    (["--task", "lm", "--momentum", "0.9", "--sparse-embeddings"], "--momentum has no proximal or sparse step"),
    (["--l1", "0.1", "--optimizer", "adamw"], "--l1 is an option of --optimizer adagrad or adagrad-da"),
    (["--rowwise-embeddings"], "--rowwise-embeddings is an option of --task lm, not mnist"),
    (["--model", "transformer"], "does not fit --task mnist"),
    (["--task", "lm", "--model", "cnn"], "does not fit --task lm"),
    (["--dataset", "cifar10"], "is not an image dataset"),
    (["--task", "lm", "--dim", "100", "--heads", "3"], "must be a multiple of --heads"),
    (["--task", "lm", "--dataset", "no/such/file.txt"], "does not exist"),
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--resume", "--checkpoint-dir", "{tmp}/empty"], "no checkpoint in"),
    (["--reproduce", "{tmp}/missing.jsonl"], "--reproduce {tmp}/missing.jsonl does not exist"),
    (["--batch-size", "3", "--streams", "4"], "is smaller than the 1 process(es) x 4 stream(s)"),
    # Integer ranges MLX accepts, shapes MLX requires, text that is text, options that apply.
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--seed", str(2**64)], "--seed must be in [0, 9223372036854775807]"),
    (["--epochs", "1000000"], "--epochs must be in [1, 100000]"),
    (["--steps", "1.5"], "--steps expected an integer, got '1.5'"),
    (["--warmup", "100000"], "--warmup 100000 is not shorter than the run's"),
    (["--task", "lm", "--hash-buckets", str(2**40)], "--hash-buckets must be in [0, 2147483647]"),
    (["--task", "lm", "--dim", "96", "--heads", "32"], "gives each head 3 dims; RoPE rotates pairs"),
    (["--dataset", ""], "--dataset must not be empty"),
    (["--log-file", "run\udcff.jsonl"], "--log-file is not valid UTF-8 text"),
    (["--context", "32"], "--context is an option of --task lm, not mnist"),
    (["--optimizer", "sgd", "--eps", "1e-8"], "--eps is an option of --optimizer adagrad, mlx-adagrad"),
    (
        ["--sparse-embeddings", "--task", "lm", "--optimizer", "adamw"],
        "--sparse-embeddings is an option of --optimizer adagrad",
    ),
]


@pytest.mark.parametrize("args, message", CORPUS, ids=[" ".join(a) for a, _ in CORPUS])
def test_the_command_line_corpus_gives_one_line_and_touches_nothing(tmp_path, mnist_dir, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    before = snapshot(tmp_path)
    verify = [] if "--reproduce" in args else ["--verify-data", "off"]
    error = fails(capsys, ["--data-dir", str(mnist_dir), *verify, *args])
    assert message.replace("{tmp}", str(tmp_path)) in error, error
    assert snapshot(tmp_path) == before


def test_a_local_data_file_of_other_content_is_refused(tmp_path, mnist_dir, capsys):
    """Valid IDX files that are not the originals (here: the tests' own) are checked by sha256."""
    before = snapshot(mnist_dir)
    error = fails(capsys, ["--data-dir", str(mnist_dir), "--batch-size", "32", "--steps", "1"])
    assert "is not the original file (sha256" in error and "--verify-data off" in error
    assert snapshot(mnist_dir) == before


@pytest.mark.parametrize(
    "content, message",
    [(b"caf\xe9 au lait\n" * 50, "is not UTF-8 text (byte 3"), (b"\x7fELF\x02\x01\x00\x00" * 100, "is not text")],
    ids=["latin-1", "binary"],
)
def test_text_that_cannot_be_read_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    error = fails(capsys, ["--task", "lm", "--dataset", str(path), "--cache-dir", str(tmp_path / "cache")])
    assert message in error and str(path) in error


def test_a_damaged_or_unwritable_tokenizer_cache_is_rebuilt_or_bypassed(tmp_path, capsys):
    from data import text

    corpus = make_text()
    cache = tmp_path / "cache"
    sp = text.tokenizer(corpus, 300, "bpe", cache)
    (entry,) = cache.iterdir()
    entry.write_bytes(b"garbage")  # damaged: trained again and replaced
    assert text.tokenizer(corpus, 300, "bpe", cache).encode(corpus) == sp.encode(corpus)
    assert entry.read_bytes() != b"garbage"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a file where the cache folder should be: trained, used, not cached
    assert text.tokenizer(corpus, 300, "bpe", blocker).encode(corpus) == sp.encode(corpus)
    assert "tokenizer not cached" in capsys.readouterr().err


def test_a_batch_that_cannot_fit_in_memory_is_refused_with_the_estimate(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text(make_text())
    argv = [
        "--task",
        "lm",
        "--dataset",
        str(tmp_path / "corpus.txt"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--vocab-size",
        "300",
    ]
    error = fails(capsys, [*argv, "--batch-size", "100000"])
    assert "--batch-size 100000 needs about" in error and "GiB available: use a smaller --batch-size" in error


# ---------------------------------------------------------------------------------------
# Interrupted runs resume exactly


def run_cli(args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for_lines(log, count, process, timeout=120):
    start = time.perf_counter()
    while time.perf_counter() - start < timeout and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= count:
            return True
        time.sleep(0.02)
    return False


def final_state(ckpt):
    return {k: v for k, v in mx.load(str(ckpt / "checkpoint.safetensors")).items()}


@pytest.fixture
def uninterrupted(tmp_path, mnist_dir):
    """The run the interrupted ones must equal: its log without timings and its final checkpoint."""
    ckpt, log = tmp_path / "whole", tmp_path / "whole.jsonl"
    args = ["--data-dir", str(mnist_dir), *SMALL, "--epochs", "3", "--checkpoint-every", "3"]
    train.main([*args, "--checkpoint-dir", str(ckpt), "--log-file", str(log)])
    return args, without_timings(read_log(log)), final_state(ckpt)


def assert_same_run(log, ckpt, uninterrupted):
    _, records, arrays = uninterrupted
    got = without_timings(read_log(log))
    assert got[1:] == records[1:], "the resumed log differs from the uninterrupted one"
    final = final_state(ckpt)
    assert final.keys() == arrays.keys() and all(mx.array_equal(final[k], arrays[k]) for k in final)


def test_a_state_saved_at_an_epochs_end_is_the_state_the_loop_goes_on_from():
    """After an epoch's last batch the loop starts the next epoch and drops the losses not yet logged;
    a checkpoint taken just before (a stop signal there, say) must hold that state, or the resumed
    run's next logged mean would include losses the uninterrupted run never logs."""
    at_the_end = RunState(step=10, epoch=0, batch=5, window=[1.0, 2.0])
    saved = RunState.from_json(at_the_end.to_json(batches_per_epoch=5))
    at_the_end.roll_over(5)
    assert saved == at_the_end and (saved.epoch, saved.batch, saved.window) == (1, 0, [])
    mid_epoch = RunState(step=8, epoch=0, batch=3, window=[1.0])
    assert RunState.from_json(mid_epoch.to_json(batches_per_epoch=5)) == mid_epoch


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_saves_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path, uninterrupted, stop):
    args, records, _ = uninterrupted
    ckpt, log = tmp_path / "ckpt", tmp_path / "run.jsonl"
    run = [*args, "--checkpoint-dir", str(ckpt), "--log-file", str(log)]
    process = run_cli(run)
    assert wait_for_lines(log, 8, process), process.communicate()
    process.send_signal(stop)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + stop and "Traceback" not in err, err
    assert f"stopped by {stop.name} at step" in err and "--resume" in err
    done = run_cli([*run, "--resume"])
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert_same_run(log, ckpt, uninterrupted)


def again(ckpt):
    """What a user runs next: --resume once there is a checkpoint; before the first one, the run starts over
    (its log is refused without --overwrite)."""
    return ["--resume"] if (ckpt / "checkpoint.safetensors").exists() else ["--overwrite"]


@pytest.mark.parametrize("seed", [0, 1, *[pytest.param(seed, marks=pytest.mark.slow) for seed in range(2, 12)]])
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_run(tmp_path, uninterrupted, seed):
    args, records, _ = uninterrupted
    ckpt, log = tmp_path / "ckpt", tmp_path / "run.jsonl"
    run = [*args, "--checkpoint-dir", str(ckpt), "--log-file", str(log)]
    rng = random.Random(seed)
    for _ in range(3):  # kills
        process = run_cli(run + again(ckpt))
        lines = len(log.read_text().splitlines()) if log.exists() else 0
        if not wait_for_lines(log, lines + rng.randint(2, 6), process):
            break  # it finished before this kill
        time.sleep(rng.random() * 0.2)
        process.kill()
        process.communicate()
    done = run_cli(run + again(ckpt))
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert not list(ckpt.glob(".checkpoint.tmp*"))
    assert json.loads((ckpt / "checkpoint.json").read_text()) == json.loads(
        mx.load(str(ckpt / "checkpoint.safetensors"), return_metadata=True)[1]["run_state"]
    )
    assert_same_run(log, ckpt, uninterrupted)


# ---------------------------------------------------------------------------------------
# A stop signal at any moment: one line, 128 + the signal


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("delay", [0.0, 0.4, 1.5])
def test_a_stop_signal_at_any_moment_is_one_line(tmp_path, stop, delay):
    """From the first line train.py prints on: loading text, training the tokenizer, compiling,
    training, evaluating; a signal ends the run with one line and exit 128 + its number."""
    (tmp_path / "corpus.txt").write_text(make_text() * 20)
    argv = ["--task", "lm", "--dataset", str(tmp_path / "corpus.txt"), "--cache-dir", str(tmp_path / "cache"),
            "--vocab-size", "300", "--dim", "64", "--epochs", "3",
            "--checkpoint-dir", str(tmp_path / "ckpt")]  # fmt: skip
    process = run_cli(argv, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    assert process.stdout.readline().startswith("device: "), "train.py did not start"
    time.sleep(delay)
    process.send_signal(stop)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert process.returncode == 128 + stop, err
    assert len(lines) == 1 and lines[0].startswith(f"train.py: stopped by {stop.name}"), err


@pytest.mark.parametrize("buffered", [False, True], ids=["unbuffered", "buffered"])
def test_a_closed_standard_output_is_one_line(tmp_path, mnist_dir, buffered):
    """python train.py | head: the reader leaves while the run prints (unbuffered) or before its
    last flush (buffered); either way one line, 128 + SIGPIPE, and the run saved as a stop saves it."""
    ckpt = tmp_path / "ckpt"
    args = ["--data-dir", str(mnist_dir), *SMALL, "--epochs", "3", "--checkpoint-every", "1"]
    unbuffered = {"PYTHONUNBUFFERED": "" if buffered else "1"}
    process = run_cli([*args, "--checkpoint-dir", str(ckpt)], env=os.environ | unbuffered)
    while not buffered and not process.stdout.readline().startswith("epoch 1"):  # the reader leaves after a line
        assert process.poll() is None, process.communicate()
    process.stdout.close()
    err = process.stderr.read()
    process.wait(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert process.returncode == 128 + signal.SIGPIPE, err
    assert len(lines) == 1 and lines[0].startswith("train.py: stopped because its standard output was closed"), err
    step = checkpoint.read(ckpt / "checkpoint.safetensors")[1]["step"]
    assert step > 0
    if not buffered:  # the stop came while training: it saved where it stood, and says how to continue
        assert f"at step {step}; saved step {step} in {ckpt}: continue with " in lines[0] and "--resume" in lines[0]


def test_the_wall_clock_continues_across_a_resume(tmp_path, mnist_dir, monkeypatch):
    ckpt, log = tmp_path / "ckpt", tmp_path / "run.jsonl"
    base = ["--data-dir", str(mnist_dir), *SMALL, "--checkpoint-dir", str(ckpt), "--log-file", str(log)]
    take_step = train.take_step

    def slow_step(*args):
        time.sleep(0.1)
        return take_step(*args)

    monkeypatch.setattr(train, "take_step", slow_step)
    train.main([*base, "--steps", "10"])  # at least 1 s of training
    saved = json.loads((ckpt / "checkpoint.json").read_text())["elapsed_s"]
    monkeypatch.setattr(train, "take_step", take_step)
    train.main([*base, "--steps", "11", "--resume"])
    final = read_log(log)[-1]
    assert saved >= 1.0 and final["step"] == 11 and final["elapsed_s"] > saved, (saved, final)
