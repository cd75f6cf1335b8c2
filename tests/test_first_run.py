"""What a new user sees first: the device line, progress off a terminal, missing data, a finished run
resumed, and the resume hint after a stop."""

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from data import mnist
from tests.test_mnist import small_run, write_small_mnist

REPO = Path(__file__).parents[1]


def test_missing_data_is_one_line_naming_every_file_with_its_full_sha256(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mnist, "MIRRORS", {"mnist": ["http://127.0.0.1:9/"]})  # port 9: refused at once
    with pytest.raises(SystemExit) as exit_:
        train.main(["--data-dir", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    for key, name in mnist.FILES.items():
        assert lines[0].count(f"{name} (sha256 {mnist.SHA256['mnist'][key]})") == 1, lines[0]
    assert f"in {tmp_path / 'mnist'}" in lines[0] and "--data-dir" in lines[0]


def test_a_folder_where_a_data_file_belongs_is_one_line(tmp_path, capsys):
    write_small_mnist(tmp_path)
    (tmp_path / "mnist" / mnist.FILES["test_labels"]).unlink()
    (tmp_path / "mnist" / mnist.FILES["test_labels"]).mkdir()
    with pytest.raises(SystemExit) as exit_:
        train.main(small_run(tmp_path))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "is a folder, expected the file" in lines[0], lines


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    write_small_mnist(tmp_path)
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    argv = [*small_run(tmp_path), "--steps", "4", "--checkpoint-dir", str(ckpt), "--log-file", str(log)]
    train.main(argv)
    before = {p.name: p.read_bytes() for p in [*ckpt.iterdir(), log]}
    capsys.readouterr()
    train.main([*argv, "--resume"])
    assert "already finished at step 4; nothing to do" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in [*ckpt.iterdir(), log]} == before


def test_off_a_terminal_a_run_prints_lines_not_a_progress_bar(tmp_path):
    write_small_mnist(tmp_path)
    result = subprocess.run(
        [sys.executable, "train.py", *small_run(tmp_path), "--epochs", "2", "--log-file", str(tmp_path / "log.jsonl")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr + result.stdout
    lines = result.stdout.splitlines()
    assert len(lines[0]) <= 120 and lines[0].startswith("device: cpu"), lines[0]
    assert [line.split(":")[0] for line in lines if line.startswith("epoch")] == ["epoch 1", "epoch 2"]
    header = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert header["blas"].endswith(", 1 thread"), header["blas"]  # the details go into the log


@pytest.mark.parametrize("folder", ["plain", "with space's & $dollar"])
@pytest.mark.parametrize("first", ["--overwrite", "--overw"], ids=["overwrite", "abbreviated"])
def test_the_resume_hint_is_a_command_that_continues_the_run(tmp_path, folder, first):
    """The stop line ends in a shell command: pasted back as printed, from where the run was started, it
    continues the run (paths quoted, the options as typed, --resume in place of --overwrite)."""
    where = tmp_path / folder
    write_small_mnist(where)
    log, script = where / "log.jsonl", str(REPO / "train.py")  # typed as a path from elsewhere
    argv = [*small_run(where), "--epochs", "50", "--log-every", "1", "--log-file", str(log), first]
    argv += ["--checkpoint-dir", str(where / "ckpt")]
    process = subprocess.Popen([sys.executable, script, *argv], cwd=where, stderr=subprocess.PIPE, text=True)
    start = time.perf_counter()
    while not (log.exists() and len(log.read_text().splitlines()) > 2) and time.perf_counter() - start < 120:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    hint = err.strip().split("continue with ", 1)[1]
    assert shlex.split(hint)[1:] == [script, *[a for a in argv if a != first], "--resume"], hint
    saved = json.loads((where / "ckpt" / "checkpoint.json").read_text())["step"]
    # Pasted back with a stop after a few more steps: it resumed where it stood, into the same log.
    resumed = subprocess.run(["sh", "-c", f"{hint} --steps {saved + 3}"], cwd=where, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {where / 'ckpt'} at step {saved}" in resumed.stdout
    assert json.loads((where / "ckpt" / "checkpoint.json").read_text())["step"] == saved + 3
