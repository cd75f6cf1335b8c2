"""train.py --reproduce: a recorded run is rerun and every logged value compared."""

import json
from pathlib import Path

import pytest

import train
from tests.test_mnist import small_run, write_small_mnist

REPO = Path(__file__).parents[1]


def reproduce(capsys, log, steps, data_dir=None):
    argv = ["--reproduce", str(log), "--reproduce-steps", str(steps)] + (
        ["--data-dir", str(data_dir)] if data_dir else []
    )
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    return exit_.value.code, capsys.readouterr().out.strip().splitlines()[-1]


def record(tmp_path, *args):
    """A small recorded run: its log's path and records."""
    write_small_mnist(tmp_path)
    log = tmp_path / "recorded.jsonl"
    train.main([*small_run(tmp_path), "--log-file", str(log), *args])
    return log, [json.loads(line) for line in log.read_text().splitlines()]


def rewrite(log, records):
    log.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_reproduces_a_recorded_run_and_catches_a_changed_value(tmp_path, capsys):
    log, records = record(tmp_path, "--epochs", "2", "--log-every", "2", "--optimizer", "adamw", "--warmup", "3")
    code, verdict = reproduce(capsys, log, 12, tmp_path)
    assert code == 0 and verdict.startswith("REPRODUCED: 12 logged values over 12 steps match, bit-exact"), verdict

    records[3]["loss"] = records[3]["loss"] * (1 + 1e-7)  # one value off in its last bits
    rewrite(log, records)
    code, verdict = reproduce(capsys, log, 12, tmp_path)
    assert (
        code == 1
        and verdict.startswith("MISMATCH: 1 of 12 values differ")
        and f"step {records[3]['step']} loss" in verdict
    )


def test_not_a_log_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("hello\n")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--reproduce", str(bad)])
    assert exit_.value.code == 2 and "is not a log written by train.py" in capsys.readouterr().err


@pytest.mark.parametrize(
    "run", ["mnist_mlp_adagrad.jsonl", "mnist_cnn_adagrad.jsonl", "lm_tinyshakespeare_adagrad.jsonl"]
)
def test_documented_curves_reproduce(capsys, run, real_data):
    """The check CI runs: the first steps of a README curve, rerun from its recorded command."""
    dataset = json.loads((REPO / "curves" / run).read_text().splitlines()[0])["config"]["dataset"]
    code, verdict = reproduce(capsys, REPO / "curves" / run, 20, real_data(dataset))
    assert code == 0, verdict


def test_a_run_from_another_device_is_compared_within_the_tolerance(tmp_path, capsys):
    log, records = record(tmp_path, "--steps", "6", "--log-every", "2")
    records[0]["device"] = "gpu"
    rewrite(log, records)
    code, verdict = reproduce(capsys, log, 6, tmp_path)
    assert code == 0 and verdict.startswith("REPRODUCED: 6 logged values over 6 steps match, within rtol"), verdict


def test_a_log_naming_an_unknown_model_is_refused_before_training(tmp_path, capsys):
    log, records = record(tmp_path, "--steps", "2", "--log-every", "1")
    records[0]["config"]["model"] = "resnet"
    rewrite(log, records)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--reproduce", str(log), "--data-dir", str(tmp_path), "--verify-data", "off"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and "reproducing" not in out
    expected = f"{log} records --model 'resnet', not one of mlp, cnn, transformer: it is not a log of this program"
    assert err.strip().splitlines()[-1] == f"train.py: error: {expected}"
