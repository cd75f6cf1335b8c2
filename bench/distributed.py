"""Training throughput on a CPU, setup by setup: train.py on 1 process as MLX comes (--cpu-tuning off),
with training/cpu_tuning.py on 1 or 2 BLAS threads or 2 streams, and on 2 processes under mlx.launch, in one run.

    python bench/distributed.py [--tasks mnist cnn lm ptb] [--rounds 2]
                                                                [--setups 0 1 ...]

Each cell runs the real recipe (`train.py --steps N`, default global batch) and reports the
median of its logged samples/s (tokens/s for the LM), skipping the first record, which holds
the compilation. The setups take turns for --rounds rounds so load on the machine hits all
alike; the table shows the best round of each. On one machine the 2 processes share its
cores, so this measures what data parallelism costs and gains there, not across machines.
One more setup runs --streams 2 with MLX's own graph order (MLX_BFS_MAX_WIDTH=20; training/cpu_tuning.py sets 1000).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).parents[1]
LAUNCH = Path(sys.executable).with_name("mlx.launch")
TASKS = {  # name: train.py's arguments for it, steps timed
    "mnist": (["--task", "mnist"], 400),
    "cnn": (["--task", "mnist", "--model", "cnn"], 60),
    "lm": (["--task", "lm"], 40),
    "ptb": (["--task", "lm", "--dataset", "ptb"], 100),
}

SETUPS = {  # name: (processes, OpenBLAS threads per process, streams per process, environment)
    "1 process, 1 BLAS thread": (1, 1, 1, {}),
    "1 process, MLX as it comes (--cpu-tuning off)": (1, 1, 1, {"MLX_ADAGRAD_CPU_TUNING": "off"}),
    "1 process, 2 BLAS threads": (1, 2, 1, {}),
    "1 process, 2 streams (--streams 2), 1 BLAS thread": (1, 1, 2, {}),
    "the same with MLX_BFS_MAX_WIDTH=20 (MLX's default)": (1, 1, 2, {"MLX_BFS_MAX_WIDTH": "20"}),
    "2 processes (ring), 1 BLAS thread each": (2, 1, 1, {}),
}


def unit(task):
    return "tokens/s" if "lm" in TASKS[task][0] else "samples/s"


def throughput(task, processes, threads, streams, environment, tmp):
    arguments, steps = TASKS[task]
    log = Path(tmp) / f"{task}-{processes}-{threads}-{streams}-{len(environment)}.jsonl"
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *arguments,
        "--steps",
        str(steps),
        "--blas-threads",
        str(threads),
        "--streams",
        str(streams),
        "--log-file",
        str(log),
        "--overwrite",  # each round rewrites its setup's log
    ]
    if processes > 1:
        command = [str(LAUNCH), "-n", str(processes), "--backend", "ring", "--", *command]
    # TMPDIR: mlx.launch leaves its host and port files there, and cpu_tuning.enable() points it at the kernel cache.
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env=os.environ | environment | {"TMPDIR": tmp})
    key = "tokens_per_s" if unit(task) == "tokens/s" else "samples_per_s"
    rates = [r[key] for r in map(json.loads, log.read_text().splitlines()[1:]) if key in r]
    return statistics.median(rates[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--setups", type=int, nargs="+", help="the rows to run, by number from 0 (default: all)")
    args = parser.parse_args()
    setups = {name: setup for i, (name, setup) in enumerate(SETUPS.items()) if args.setups is None or i in args.setups}

    best = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for task in args.tasks:
                for name, (processes, threads, streams, environment) in setups.items():
                    rate = throughput(task, processes, threads, streams, environment, tmp)
                    best[task, name] = max(best.get((task, name), 0.0), rate)
                    print(f"round {round_ + 1}: {task}, {name}: {rate:,.0f} {unit(task)}", file=sys.stderr)

    base = next(iter(setups))
    print("| setup | " + " | ".join(f"{task} {unit(task)} | vs 1 process" for task in args.tasks) + " |")
    print("|---|" + "---|---|" * len(args.tasks))
    for name in setups:
        cells = [f"{best[task, name]:,.0f} | {best[task, name] / best[task, base]:.2f}x" for task in args.tasks]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
