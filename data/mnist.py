"""MNIST and Fashion-MNIST from their four original IDX gz files; batches through mlx-data.

Layout: <data_dir>/mnist/train-images-idx3-ubyte.gz (and the other three), the same
for <data_dir>/fashion-mnist/. Missing files are downloaded and checked by sha256.
"""

import gzip
import zlib
from pathlib import Path

import mlx.core as mx
import mlx.data as dx
import numpy as np

from data import DataError
from data.download import ensure_files

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
SHA256 = {
    "mnist": {
        "train_images": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train_labels": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "test_images": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "test_labels": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train_images": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train_labels": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "test_images": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "test_labels": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes: 4-byte magic, ndim big-endian uint32 sizes, data."""
    fix = f"delete {path} to download it again, or replace it with the original file"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a complete gzip file ({e}): {fix}") from None
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise DataError(f"{path} has magic number {found}, expected {magic}: it is not this IDX file; {fix}")
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) != header_bytes + int(np.prod(shape)):
        raise DataError(
            f"{path} holds {len(raw) - header_bytes} data bytes but its header says {shape}: "
            f"the file is truncated or padded; {fix}"
        )
    return np.frombuffer(raw, np.uint8, offset=header_bytes).reshape(shape).copy()


def check_name(dataset: str):
    """DataError unless `dataset` is one of the image data sets."""
    if dataset not in SHA256:
        raise DataError(f"--dataset {dataset} is not an image dataset: choose {', '.join(SHA256)} (or --task lm)")


def load(dataset: str, data_dir: Path, verify: bool = True) -> dict:
    """Return {"train_images": (60000, 28, 28, 1) uint8, "train_labels": (60000,) int32, "test_...": ...}."""
    check_name(dataset)
    files = ensure_files(
        Path(data_dir) / dataset, {FILES[k]: SHA256[dataset][k] for k in FILES}, MIRRORS[dataset], verify
    )
    arrays = {}
    for split in ("train", "test"):
        paths = {kind: files[FILES[f"{split}_{kind}"]] for kind in ("images", "labels")}
        images = read_idx(paths["images"], IMAGE_MAGIC, 3)
        labels = read_idx(paths["labels"], LABEL_MAGIC, 1)
        if len(images) == 0:
            raise DataError(f"{paths['images']} holds no images: replace it with the original file")
        if images.shape[1:] != (28, 28):
            raise DataError(f"{paths['images']} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28")
        if len(images) != len(labels):
            raise DataError(
                f"{paths['images']} has {len(images)} images but {paths['labels']} has {len(labels)} labels: "
                f"the two files are from different sets; replace both"
            )
        if labels.max() > 9:
            raise DataError(
                f"{paths['labels']} has label {labels.max()}, expected 0-9: replace it with the original file"
            )
        arrays[f"{split}_images"] = images[..., None]
        arrays[f"{split}_labels"] = labels.astype(np.int32)
    return arrays


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class Batches:
    """Training batches: an mlx-data buffer, our seeded per-epoch permutation, batch, ordered prefetch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
        self.buffer = dx.buffer_from_vector([{"image": x, "label": y} for x, y in zip(images, labels)])
        self.batch_size, self.seed = batch_size, seed
        self.num_samples = len(labels)
        self.per_epoch = -(-self.num_samples // batch_size)  # the last batch may be partial

    def epoch(self, epoch: int, start_batch: int = 0):
        """Yield (images uint8 NHWC, labels int32) of `epoch`, skipping its first `start_batch` batches."""
        order = epoch_order(self.num_samples, self.seed, epoch)[start_batch * self.batch_size :]
        # ordered_prefetch: plain prefetch with 2 threads hands batches out of order.
        for batch in self.buffer.perm(order.tolist()).batch(self.batch_size).ordered_prefetch(8, 2):
            yield batch["image"], batch["label"]


def random_shift(images, max_shift: int):
    """Translate each image by a random -max_shift..max_shift pixels in x and y, filling with 0.

    Uses mx.random, so inside the compiled step it is seeded, resumable and bit-exact. Picking rows,
    then columns, of the zero-padded batch reads memory in order, unlike one gather of every pixel.
    """
    if not max_shift:
        return images
    n, height, width, _ = images.shape
    padded = mx.pad(images, [(0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)])
    offsets = mx.random.randint(0, 2 * max_shift + 1, (2, n))
    rows = offsets[0][:, None] + mx.arange(height)
    cols = offsets[1][:, None] + mx.arange(width)
    padded = mx.take_along_axis(padded, rows[:, :, None, None], axis=1)
    return mx.take_along_axis(padded, cols[:, None, :, None], axis=2)
