"""Check a rerun against a recorded run (train.py --reproduce LOG): read the log, compare the values.

Bit for bit on the same device, platform, BLAS and MLX. Elsewhere within CROSS_PLATFORM_RTOL over
the first --reproduce-steps steps (20): another BLAS rounds the matmuls differently, and Adagrad magnifies
it, since its first updates move each weight by about lr * sign(g), so a gradient near zero that
rounds to the other sign moves its weight by 2 lr. curves/README.md has the measurements.
"""

import argparse
import json
import math
from pathlib import Path

import mlx.core as mx

from training import options
from training.runlog import say

CROSS_PLATFORM_RTOL = 3e-3
COMPARED = ("loss", "lr")
SAME_MACHINE = ("device", "platform", "mlx", "blas", "cpu_ops")


class RecordError(Exception):
    """A recorded log (--reproduce LOG) that cannot be reproduced; the message says why."""


def read_log(path: Path, steps: int) -> tuple:
    """(header, {step: record}) of a train.py --log-file, its training records up to `steps`; every
    value it uses checked, so that a damaged or hand-edited log is one RecordError naming the line."""
    not_a_log = f"{path} is not a log written by train.py --log-file"
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"{not_a_log} ({getattr(e, 'strerror', None) or e.__class__.__name__})") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise RecordError(f"{not_a_log}: line {number} is not a JSON object")
        records.append(record)
    header = records[0] if records else {}
    if not isinstance(header.get("config"), dict) or not isinstance(header.get("command"), str):
        raise RecordError(f"{not_a_log}: its first line has no command and config")
    check_config(path, header["config"])
    recorded = {}
    for number, record in enumerate(records[1:], 2):
        if "loss" not in record:
            continue
        wrong = [k for k in ("step", *COMPARED) if not _is_number(record.get(k), integer=k == "step")]
        if wrong:
            raise RecordError(f"{path} line {number}: {wrong[0]} is {record.get(wrong[0])!r}, not a number of its kind")
        if record["step"] <= steps:
            recorded[record["step"]] = record
    if not recorded:
        raise RecordError(f"{path} logs no training loss within the first {steps} steps: raise --reproduce-steps")
    return header, recorded


def _is_number(value, integer=False) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float))


def check_config(path, config: dict):
    """RecordError unless every recorded option is one of this train.py's, with a value it accepts."""
    unknown = sorted(set(config) - set(options.BY_NAME) - {"world_size"})
    if unknown:
        raise RecordError(
            f"{path} records options this train.py does not have ({', '.join(unknown)}): "
            "reproduce it with the version that wrote it"
        )
    if not _is_number(config.get("world_size", 1), integer=True) or config.get("world_size", 1) < 1:
        raise RecordError(f"{path} records world_size {config.get('world_size')!r}, not a process count")
    for name, value in config.items():
        option = options.BY_NAME.get(name)
        if option is None or value is None:
            continue
        if option.choices and value not in option.choices:
            raise RecordError(
                f"{path} records {option.flags} {value!r}, not one of {', '.join(option.choices)}: "
                "it is not a log of this program"
            )
        if option.flag:
            accepted = isinstance(value, bool)
        elif option.type in (options.text, options.path):
            accepted = isinstance(value, str)
        else:
            try:  # the option's own parser and range, on a number of its kind
                accepted = _is_number(value, integer=option.type.__name__ == "int") and option.type(str(value)) == value
            except (ValueError, argparse.ArgumentTypeError):
                accepted = False
        if not accepted:
            raise RecordError(f"{path} records {option.flags} {value!r}, which this train.py does not accept")


def same_machine(header: dict, rerun_header: dict) -> bool:
    """Whether the two runs ran on the same device, platform, BLAS, MLX and formulations (logs from
    before the device was recorded ran on the CPU with the CPU formulations)."""
    defaults = {"device": "cpu", "cpu_ops": True}
    return all(header.get(k, defaults.get(k)) == rerun_header.get(k) for k in SAME_MACHINE)


def compare(recorded: dict, rerun: dict, exact: bool) -> list:
    """Each differing value as a line, in step order."""
    mismatches = []
    for step, want in sorted(recorded.items()):
        got = rerun.get(step, {})
        for key in COMPARED:
            if key not in got:
                mismatches.append(f"step {step}: no {key} logged")
            elif (
                (got[key] != want[key]) if exact else not math.isclose(got[key], want[key], rel_tol=CROSS_PLATFORM_RTOL)
            ):
                mismatches.append(f"step {step} {key}: {got[key]!r} != recorded {want[key]!r}")
    return mismatches


def verdict(mismatches: list, recorded: dict, steps: int, exact: bool) -> str:
    how = (
        "bit-exact (same device, platform, BLAS and MLX)"
        if exact
        else f"within rtol {CROSS_PLATFORM_RTOL} (other device, platform, BLAS or MLX)"
    )
    values = len(COMPARED) * len(recorded)
    if mismatches:
        return f"MISMATCH: {len(mismatches)} of {values} values differ {how}; first: {mismatches[0]}"
    return f"REPRODUCED: {values} logged values over {steps} steps match, {how}"


def prepare(config, rerun_log: Path) -> tuple:
    """(the options of the rerun, the recorded log's header, its training records): the run that
    config.reproduce records, for its first --reproduce-steps steps, logged to `rerun_log`."""
    log, steps = config.reproduce, config.reproduce_steps
    header, recorded = read_log(log, steps)
    world = mx.distributed.init().size()
    recorded_world = header["config"].get("world_size", 1)
    if recorded_world != world:
        raise RecordError(
            f"{log} was recorded on {recorded_world} process(es), this is {world}: "
            f"run mlx.launch -n {recorded_world} -- python train.py --reproduce {log}"
        )
    recorded_config = {k: v for k, v in header["config"].items() if k != "world_size"}
    cache_dir = Path(recorded_config["cache_dir"]) if recorded_config.get("cache_dir") else None
    here = {name: getattr(config, name) for name in ("data_dir", "device", "stock_ops", "cpu_tuning")}
    if config.verify_data == "off":  # else as the run recorded it
        here["verify_data"] = "off"
    rerun_config = options.complete(
        {
            **recorded_config,
            **here,
            "cache_dir": cache_dir if cache_dir and cache_dir.parent.exists() else None,
            "steps": steps,
            "log_file": rerun_log,
            **dict.fromkeys(["checkpoint_dir", "resume", "overwrite", "sample", "reproduce"]),
        }
    )  # what an older log left to the defaults of its time is filled with today's
    say(f"reproducing {log}: {header['command']} (first {steps} steps)")
    return rerun_config, header, recorded


def judge(header: dict, recorded: dict, rerun_log: Path, steps: int) -> int:
    """Compare the rerun's logged losses and learning rates with the recorded ones, and say how they
    compare: 0 if they match, else 1."""
    lines = [json.loads(line) for line in Path(rerun_log).read_text().splitlines()]
    rerun_header, rerun_records = lines[0], {r["step"]: r for r in lines[1:] if "loss" in r}
    exact = same_machine(header, rerun_header)
    mismatches = compare(recorded, rerun_records, exact)
    print(verdict(mismatches, recorded, steps, exact))
    return 1 if mismatches else 0
