"""Check a rerun against a recorded run (train.py --reproduce LOG): read the log, compare the values.

Bit for bit on the same device, platform, BLAS and MLX. Elsewhere within CROSS_PLATFORM_RTOL over
the first REPRODUCE_STEPS steps: another BLAS rounds the matmuls differently, and Adagrad magnifies
it, since its first updates move each weight by about lr * sign(g), so a gradient near zero that
rounds to the other sign moves its weight by 2 lr. curves/README.md has the measurements.
"""

import json
import math
from pathlib import Path

CROSS_PLATFORM_RTOL = 3e-3
REPRODUCE_STEPS = 20
COMPARED = ("loss", "lr")
SAME_MACHINE = ("device", "platform", "mlx", "blas", "cpu_ops")


class LogError(Exception):
    """A file that is not a usable train.py log; the message says why."""


def read_log(path: Path, steps: int, known_options) -> tuple:
    """(header, {step: record}) of a train.py --log-file, its training records up to `steps`."""
    try:
        lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
        header = lines[0]
        config = header["config"]
        header["command"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise LogError(f"{path} is not a log written by train.py --log-file ({type(e).__name__}: {e})") from None
    unknown = sorted(set(config) - set(known_options) - {"world_size"})
    if unknown:
        raise LogError(
            f"{path} records options this train.py does not have ({', '.join(unknown)}): "
            "reproduce it with the version that wrote it"
        )
    recorded = {r["step"]: r for r in lines[1:] if "loss" in r and r["step"] <= steps}
    if not recorded:
        raise LogError(f"{path} logs no training loss within the first {steps} steps: raise --reproduce-steps")
    return header, recorded


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
