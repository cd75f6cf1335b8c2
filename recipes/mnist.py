"""MNIST and Fashion-MNIST: an MLP or a small CNN classifying 28 x 28 digits (or clothes) into 10 classes.

python train.py --task mnist [--model cnn] [--dataset fashion-mnist]
"""

import mlx.core as mx
import mlx.nn as nn

from data import mnist
from models.cnn import CNN
from models.mlp import MLP
from models.ops import Ops
from recipes import Recipe, digest


class MNIST(Recipe):
    """Training images randomly shifted by up to --augment-shift pixels; evaluated on the 10,000 test images."""

    unit = "samples"

    def __init__(self, config, ops: Ops):
        data = mnist.load(config.dataset, config.data_dir, config.verify_data == "on")
        self.test_images, self.test_labels = data["test_images"], data["test_labels"]
        self.content = {"data_sha256": digest(*data.values())}
        self.batches = mnist.Batches(data["train_images"], data["train_labels"], config.batch_size, config.seed)
        self.max_shift = config.augment_shift
        self.model = MLP(dropout=config.dropout) if config.model == "mlp" else CNN(dropout=config.dropout, ops=ops)

    def losses(self, model, images, labels):
        return nn.losses.cross_entropy(model(images), labels, reduction="none")

    def augment(self, images):
        return mnist.random_shift(images, self.max_shift)

    def count(self, batch) -> int:
        return len(batch[1])

    def evaluate(self, model, final=False):
        total_loss, correct, n = 0.0, 0, len(self.test_labels)
        for i in range(0, n, 1000):
            x, y = mx.array(self.test_images[i : i + 1000]), mx.array(self.test_labels[i : i + 1000])
            logits = model(x)
            loss, hits = nn.losses.cross_entropy(logits, y, reduction="sum"), (logits.argmax(axis=1) == y).sum()
            total_loss, correct = total_loss + loss.item(), correct + hits.item()
        metrics = {"test_loss": total_loss / n, "test_acc": correct / n}
        return metrics, f"test loss {metrics['test_loss']:.4f}, test accuracy {100 * metrics['test_acc']:.2f}%"

    def activations_per_sample(self) -> int:
        if isinstance(self.model, CNN):
            return 400_000  # two blocks of 32 and 64 channels: unfolded inputs, outputs, Winograd tiles
        return 8 * (784 + 512 + 512)
