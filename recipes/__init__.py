"""The recipes train.py trains, one module each (recipes/mnist.py, recipes/lm.py), each a Recipe.

A recipe owns its data, model, loss and evaluation; train.py owns the loop that every recipe shares.
"""

import hashlib
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from data import DataError


class Recipe:
    """What train.py trains: a model, its training batches, its loss and its evaluation.

    A subclass builds them from the options in __init__ and provides the methods below marked as
    its own; `batches` has `per_epoch` and `epoch(epoch, start_batch)`, which yields (inputs,
    targets) NumPy arrays, the same for the same seed and step (a resumed run sees the same data).
    """

    unit: str  # what `count` counts: "samples" or "tokens"
    model: nn.Module
    batches: object
    content: dict  # digests of what it trains on (data, tokenizer): a checkpoint resumes only on the same
    sizes = "the model"  # the options that size the model, for the memory check's message

    def losses(self, model, inputs, targets) -> mx.array:
        """Its own: each target's cross-entropy, -log p(target | inputs)."""
        raise NotImplementedError

    def augment(self, inputs):
        """Its own, if any: the training-time change of a batch's inputs (under the compiled step)."""
        return inputs

    def count(self, batch) -> int:
        """Its own: the samples or tokens in a batch, for the speed train.py logs."""
        raise NotImplementedError

    def evaluate(self, model, final: bool) -> tuple:
        """Its own: (metrics, a one-line summary), on the test split after the last epoch (`final`)."""
        raise NotImplementedError

    def activations_per_sample(self) -> int:
        """Its own: roughly how many float32 values one training sample's forward and backward pass hold."""
        raise NotImplementedError

    def loss(self, model, inputs, targets, scale):
        """The loss the step differentiates: the summed cross-entropy of the augmented batch times
        `scale`, which is 1 / (targets in the global batch), so on one process the batch mean."""
        return self.losses(model, self.augment(inputs), targets).sum() * scale

    def model_bytes(self) -> int:
        """The memory of the parameters, their gradients, optimizer state and update, all float32.
        The model is built but not evaluated (MLX computes lazily), so its parameters are counted
        before any is allocated."""
        return 4 * 4 * sum(v.size for _, v in tree_flatten(self.model.parameters()))

    def step_bytes(self, batch_size: int) -> int:
        """A rough estimate (within about 2x) of the memory a training step needs: model_bytes, and
        each sample's float32 activations and their gradients."""
        return self.model_bytes() + 4 * 2 * batch_size * self.activations_per_sample()

    def check_memory(self, batch_size: int):
        """DataError when a training step would need more memory than there is, naming what to shrink."""
        have = available_memory()
        if have is not None and self.model_bytes() > have:
            raise DataError(
                f"the model needs about {self.model_bytes() / 2**30:.1f} GiB with its gradients and optimizer state "
                f"(an estimate), more than the {have / 2**30:.1f} GiB available: make {self.sizes} smaller"
            )
        if have is not None and self.step_bytes(batch_size) > have:
            raise DataError(
                f"--batch-size {batch_size} needs about {self.step_bytes(batch_size) / 2**30:.1f} GiB a step (an "
                f"estimate), more than the {have / 2**30:.1f} GiB available: use a smaller --batch-size"
            )


def digest(*parts) -> str:
    """sha256 of what a run trains on (arrays or bytes), for its checkpoint: a resume must train on the same."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else part)
    return h.hexdigest()[:16]


def available_memory():
    """Bytes this process may still use, or None where that cannot be read."""
    if mx.default_device().type == mx.DeviceType.gpu:
        return mx.device_info().get("memory_size")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
