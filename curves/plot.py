"""Plot the recorded runs in curves/: one PNG per task, optimizers overlaid.

    pip install matplotlib && python curves/plot.py

Left panel: training loss (mean over each logging interval) per step. Right panel: the
evaluation metric per evaluation (MNIST test accuracy; LM validation nats per character).
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
PLOTS = {  # png name: (title, log-file pattern, metric key, metric label)
    "mnist.png": ("MNIST, MLP 784-512-512-10", "mnist_mlp_*.jsonl", "test_acc", "test accuracy (%)"),
    "lm_tinyshakespeare.png": ("Tiny Shakespeare, transformer LM", "lm_tinyshakespeare_*.jsonl",
                               "val_nats_per_char", "validation loss (nats per character)"),
    "lm_ptb.png": ("Penn Treebank, transformer LM", "lm_ptb_*.jsonl", "val_nats_per_char",
                   "validation loss (nats per character)"),
}


def read(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return records[0], [r for r in records[1:] if "loss" in r], [r for r in records[1:] if "loss" not in r]


def plot(png, title, pattern, metric, metric_label):
    runs = sorted(HERE.glob(pattern))
    if not runs:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for path in runs:
        header, steps, evals = read(path)
        label = f"{header['config']['optimizer']} (lr {header['config']['lr']:g})"
        left.plot([r["step"] for r in steps], [r["loss"] for r in steps], label=label, linewidth=1)
        scale = 100 if metric == "test_acc" else 1
        right.plot([r["step"] for r in evals], [scale * r[metric] for r in evals], marker="o", label=label)
    left.set(xlabel="step", ylabel="training loss (nats per token)" if "lm" in png else "training loss (nats)",
             yscale="log", title=title)
    right.set(xlabel="step", ylabel=metric_label, title=title)
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(HERE / png, dpi=110)
    print(f"wrote {HERE / png}")


if __name__ == "__main__":
    for png, spec in PLOTS.items():
        plot(png, *spec)
