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


def edit_header(key, value):
    return lambda records: records[0]["config"].__setitem__(key, value)


def edit_record(key, value):
    return lambda records: next(r for r in records[1:] if "loss" in r).__setitem__(key, value)


BAD_LOGS = [  # (how the recorded log is damaged, a fragment of the one line)
    ("a line that is a list", lambda records: records.insert(1, [1, 2]), "line 2 is not a JSON object"),
    ("no config", lambda records: records[0].pop("config"), "has no command and config"),
    ("a loss that is text", edit_record("loss", "0.5"), "loss is '0.5', not a number"),
    ("a float step", edit_record("step", 2.0), "step is 2.0, not a number"),
    ("a float batch size", edit_header("batch_size", 32.5), "records --batch-size 32.5"),
    ("text for a number", edit_header("lr", "fast"), "records --lr 'fast'"),
    ("a dropout out of range", edit_header("dropout", 1.5), "records --dropout 1.5"),
    ("a flag that is not a bool", edit_header("resume", "yes"), "records --resume 'yes'"),
    ("a model this program lacks", edit_header("model", "resnet"), "records --model 'resnet', not one of"),
    ("an option this program lacks", edit_header("nesterov", True), "options this train.py does not have (nesterov)"),
    ("a process count that is text", edit_header("world_size", "two"), "world_size 'two'"),
]


@pytest.mark.parametrize("how, damage, message", BAD_LOGS, ids=[case[0] for case in BAD_LOGS])
def test_a_damaged_or_edited_log_is_one_line(tmp_path, capsys, how, damage, message):
    log, records = record(tmp_path, "--steps", "4", "--log-every", "2")
    damage(records)
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(SystemExit) as exit_:
        train.main(["--reproduce", str(log), "--data-dir", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage", b"{}\n"], ids=["empty", "binary", "empty object"])
def test_a_file_that_is_no_log_is_one_line(tmp_path, capsys, content):
    (tmp_path / "log.jsonl").write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--reproduce", str(tmp_path / "log.jsonl")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "is not a log written by train.py" in lines[0], lines
