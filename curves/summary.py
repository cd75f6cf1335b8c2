"""Print the README's results table from the recorded runs in curves/.

python curves/summary.py
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent


def summarize(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    header, steps = records[0], [r for r in records[1:] if "loss" in r]
    evals = [r for r in records[1:] if "loss" not in r]
    if not evals:
        return f"| {path.stem} | `{header['command']}` | (no evaluation yet) | | |"
    final, config = evals[-1], header["config"]
    rate_key = "tokens_per_s" if config["task"] == "lm" else "samples_per_s"
    rate = statistics.median(r[rate_key] for r in steps)
    if config["task"] == "mnist":
        first_98 = next((r["elapsed_s"] for r in evals if r["test_acc"] >= 0.98), None)
        result = f"test accuracy {100 * final['test_acc']:.2f}%" + (
            f" (98% after {first_98:.0f} s)" if first_98 else ""
        )
    else:
        result = f"val {final['val_nats_per_char']:.3f} nats/char"
        if "test_word_ppl" in final:
            result += (
                f", test {final['test_nats_per_char']:.3f} nats/char, test word perplexity {final['test_word_ppl']:.1f}"
            )
    unit = "tokens/s" if config["task"] == "lm" else "samples/s"
    return (
        f"| {path.stem} | `{header['command']}` | {result} | {final['elapsed_s'] / 60:.1f} min | {rate:,.0f} {unit} |"
    )


# The LM recipes' targets: the README's quick-start command with our Adagrad, within 10 minutes.
TARGETS = [
    ("lm_tinyshakespeare_adagrad", "val_nats_per_char", 1.50, "validation nats/char"),
    ("lm_ptb_adagrad", "test_word_ppl", 114.5, "test word perplexity"),
]
BUDGET_S = 600


def targets():
    """One line per target: the run's final value and wall clock against the target, met or missed."""
    for run, key, target, name in TARGETS:
        path = HERE / f"{run}.jsonl"
        if not path.is_file():
            yield f"{run}: not recorded"
            continue
        final = [json.loads(line) for line in path.read_text().splitlines()][-1]
        value, elapsed = final.get(key, float("inf")), final.get("elapsed_s", float("inf"))
        met = value <= target and elapsed <= BUDGET_S
        yield (
            f"{run}: {name} {value:.4g} (target <= {target}) in {elapsed:.0f} s (budget {BUDGET_S} s): "
            + ("met" if met else "MISSED")
        )


# Logs written before headers named the CPU: the kernel set OpenBLAS chose names its family.
CPU_BY_KERNELS = {"SkylakeX": "Intel Xeon with AVX-512", "Cooperlake": "Intel Xeon (Cooper Lake)", "Zen": "AMD EPYC"}


def machine(header):
    """The hardware and software a run was recorded on, as one line."""
    kernels = next((name for name in CPU_BY_KERNELS if f" {name} kernels" in header["blas"]), None)
    cpu = header.get("cpu") or CPU_BY_KERNELS.get(kernels, header["machine"])
    cores = header.get("cores", 2)
    return f"{cpu}, {cores} cores, {header['machine']} Linux; MLX {header['mlx']}; BLAS {header['blas']}"


if __name__ == "__main__":
    print("| run | command | result | wall clock | throughput |")
    print("|---|---|---|---|---|")
    machines = {}  # the machine each run was recorded on: its platform, MLX and BLAS
    for path in sorted(HERE.glob("*.jsonl")):
        print(summarize(path))
        header = json.loads(path.read_text().splitlines()[0])
        machines.setdefault(machine(header), []).append(path.stem)
    for machine, runs in machines.items():
        print(f"\nMachine: {machine}" + (f" ({', '.join(runs)})." if len(machines) > 1 else "."))
    print("\nTargets:")
    for line in targets():
        print(f"- {line}")
