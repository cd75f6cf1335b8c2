"""Plot the recorded runs in curves/: one PNG per task, optimizers overlaid.

    pip install matplotlib && python curves/plot.py

Left panel: training loss per step, as logged (the mean over each --log-every interval)
then smoothed by a moving average over 2% of the run. Right panel: the evaluation metric
per evaluation (MNIST test accuracy; LM validation nats per character; PTB validation
word perplexity). mlx-adagrad is dashed: in float32 it is bit-identical to adagrad, so it
lies exactly on top of it; so is a run with --sparse-embeddings, bit-identical to its dense
twin.
"""

import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).parent
PLOTS = {  # png name: (title, log-file pattern, metric key, metric label)
    "mnist.png": ("MNIST, MLP 784-512-512-10", "mnist_mlp_*.jsonl", "test_acc", "test accuracy (%)"),
    "lm_tinyshakespeare.png": (
        "Tiny Shakespeare, transformer LM",
        "lm_tinyshakespeare_*.jsonl",
        "val_nats_per_char",
        "validation loss (nats per character)",
    ),
    "lm_ptb.png": (
        "Penn Treebank, word-level transformer LM",
        "lm_ptb_[!b]*.jsonl",  # not the lm_ptb_bigrams_ runs, plotted on their own
        "val_word_ppl",
        "validation word perplexity",
    ),
    "lm_ptb_bigrams.png": (
        "PTB, with a hashed-bigram input table of 2^20 rows",
        "lm_ptb_bigrams_*.jsonl",
        "val_word_ppl",
        "validation word perplexity",
    ),
}


def read(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return records[0], [r for r in records[1:] if "loss" in r], [r for r in records[1:] if "loss" not in r]


def smooth(values):
    window = max(1, len(values) // 50)
    return np.convolve(values, np.ones(window) / window, mode="valid"), window - 1


def plot(png, title, pattern, metric, metric_label):
    runs = sorted(HERE.glob(pattern))
    if not runs:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    scale = 100 if metric == "test_acc" else 1
    finals, evaluations = {}, 0
    for path in runs:
        header, steps, evals = read(path)
        config = header["config"]
        label = f"{config['optimizer']} (lr {config['lr']:g})"
        label += ", sparse embeddings" if config.get("sparse_embeddings") else ""
        same_bits = config["optimizer"] == "mlx-adagrad" or config.get("sparse_embeddings")
        style = {"linestyle": "--", "zorder": 3} if same_bits else {}
        loss, skip = smooth([r["loss"] for r in steps])
        left.plot([r["step"] for r in steps][skip:], loss, label=label, linewidth=1.2, **style)
        right.plot([r["step"] for r in evals], [scale * r[metric] for r in evals], marker="o", label=label, **style)
        finals[label], evaluations = scale * evals[-1][metric], max(evaluations, len(evals))
    unit = "nats per token" if "lm" in png else "nats per image"
    left.set(xlabel="step", ylabel=f"training loss ({unit}, smoothed)", yscale="log", title=title)
    left.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    left.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    right.set(xlabel="step", ylabel=metric_label, title=title)
    if evaluations == 1:  # one evaluation per run (one epoch): bars, not dots
        right.clear()
        bars = right.bar(range(len(finals)), list(finals.values()), color=[f"C{i}" for i in range(len(finals))])
        right.bar_label(bars, fmt="%.1f")
        right.set_xticks(range(len(finals)), list(finals), fontsize=8)
        right.set(ylabel=f"{metric_label}, end of training", title=title)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend()
    if right.get_legend_handles_labels()[0]:
        right.legend()
    fig.tight_layout()
    fig.savefig(HERE / png, dpi=110)
    print(f"wrote {HERE / png}")


if __name__ == "__main__":
    for png, spec in PLOTS.items():
        plot(png, *spec)
