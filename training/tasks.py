"""The two tasks train.py trains: each gives a model (computing with the Ops it is given, models/ops.py),
training batches, a train-time augmentation, its loss per target (token_losses(model, inputs,
targets)) and an evaluation."""

import hashlib
import math
import os
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from data import DataError, mnist, text
from models.cnn import CNN
from models.mlp import MLP
from models.transformer import Transformer


def setup_mnist(args, ops):
    data = mnist.load(args.dataset, args.data_dir, args.verify_data == "on")
    check_memory(args)
    model = MLP(dropout=args.dropout) if args.model == "mlp" else CNN(dropout=args.dropout, ops=ops)

    def evaluate(model, final=False):
        total_loss, correct, n = 0.0, 0, len(data["test_labels"])
        for i in range(0, n, 1000):
            x, y = mx.array(data["test_images"][i : i + 1000]), mx.array(data["test_labels"][i : i + 1000])
            logits = model(x)
            loss, hits = nn.losses.cross_entropy(logits, y, reduction="sum"), (logits.argmax(axis=1) == y).sum()
            total_loss, correct = total_loss + loss.item(), correct + hits.item()
        metrics = {"test_loss": total_loss / n, "test_acc": correct / n}
        return metrics, f"test loss {metrics['test_loss']:.4f}, test accuracy {100 * metrics['test_acc']:.2f}%"

    return SimpleNamespace(
        model=model,
        content={"data_sha256": digest(*data.values())},
        evaluate=evaluate,
        unit="samples",
        per_batch=lambda batch: len(batch[1]),
        batches=mnist.Batches(data["train_images"], data["train_labels"], args.batch_size, args.seed),
        augment=partial(mnist.random_shift, max_shift=args.augment_shift),
        token_losses=lambda model, x, y: nn.losses.cross_entropy(model(x), y, reduction="none"),
    )


def setup_lm(args, ops):
    splits = text.load_splits(args.dataset, args.data_dir, args.verify_data == "on")
    sp = text.tokenizer(splits["train"], args.vocab_size, args.tokenizer, args.cache_dir)
    tokens = {split: text.encode(sp, t) for split, t in splits.items()}
    sp_ids = np.arange(sp.vocab_size())  # sp_ids[the model's token id] = SentencePiece's id
    if args.softmax == "class":  # its classes are runs of ids: renumber the vocabulary by training frequency
        sp_ids = text.by_frequency(tokens["train"], sp.vocab_size())
    model_ids = np.argsort(sp_ids).astype(np.int32)  # the inverse: model_ids[SentencePiece's id]
    tokens = {split: model_ids[t] for split, t in tokens.items()}
    if len(tokens["valid"]) < args.context + 1:
        raise DataError(
            f"--context {args.context} is longer than the validation split ({len(tokens['valid']) - 1} "
            f"tokens): use a smaller --context"
        )
    check_memory(args, sp.vocab_size())
    model = Transformer(
        sp.vocab_size(),
        args.context,
        args.layers,
        args.dim,
        args.heads,
        args.dropout,
        args.positions,
        args.softmax,
        ops,
        tied=not args.untied,
        sparse_embedding=args.sparse_embeddings,
        hash_buckets=args.hash_buckets,
    )

    def evaluate(model, final=False):
        metrics = {}
        for split in ["valid"] + (["test"] if final and "test" in splits else []):
            nll = 0.0
            for x, y, scored in text.eval_windows(tokens[split], args.context):
                nll += np.array(model.nll(mx.array(x), mx.array(y)), np.float64)[scored].sum()  # float64: 10^5 tokens
            prefix = "val" if split == "valid" else "test"
            metrics[f"{prefix}_loss"] = nll / (len(tokens[split]) - 1)
            metrics[f"{prefix}_nats_per_char"] = nll / len(splits[split])
            if args.dataset == "ptb":
                metrics[f"{prefix}_word_ppl"] = math.exp(nll / text.word_count(splits[split]))
        summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        return metrics, summary

    def sample(model, count, temperature):
        model.eval()
        sampled, key = [int(model_ids[sp.bos_id()])], mx.random.key(args.seed)
        for _ in range(count):
            logits = model(mx.array([sampled[-args.context :]]))[0, -1]
            key, subkey = mx.random.split(key)
            sampled.append(mx.random.categorical(logits / temperature, key=subkey).item())
        return text.decode(sp, sp_ids[sampled[1:]].tolist())

    content = {"data_sha256": digest(*(t.encode() for t in splits.values()))}
    content["tokenizer_sha256"] = digest(sp.serialized_model_proto())
    return SimpleNamespace(
        model=model,
        content=content,
        evaluate=evaluate,
        unit="tokens",
        per_batch=lambda batch: batch[1].size,
        sample=sample,
        batches=text.Windows(tokens["train"], args.batch_size, args.context, args.seed),
        augment=lambda x: x,
        token_losses=lambda model, x, y: model.nll(x, y),
    )


def digest(*parts) -> str:
    """sha256 of what a run trains on (arrays or bytes), for its checkpoint: a resume must train on the same."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else part)
    return h.hexdigest()[:16]


def parameter_count(args, vocab=None) -> int:
    """The model's parameters, from the options alone (tested against the models built)."""
    if args.model == "mlp":
        sizes = [28 * 28, 512, 512, 10]
        return sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:]))
    if args.model == "cnn":
        return (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64) + (7 * 7 * 64 * 128 + 128) + (128 * 10 + 10)
    dim, tables = args.dim, 1 + (args.untied or args.sparse_embeddings)
    count = tables * vocab * dim + args.hash_buckets * dim + 2 * dim  # embeddings, the last layer norm
    count += args.layers * (12 * dim * dim + 9 * dim)  # qkv, out, mlp (4x), two layer norms
    count += args.context * dim if args.positions == "learned" else 0
    if args.softmax == "class":
        count += -(-vocab // math.ceil(math.sqrt(vocab))) * dim
    return count


def step_bytes(args, vocab=None) -> int:
    """A rough estimate (within about 2x) of the memory one training step needs: the parameters,
    their gradients, optimizer state and update, and each sample's activations and their gradients."""
    if args.task == "lm":
        output = 6 * math.isqrt(vocab) if args.softmax == "class" else 3 * vocab
        per_sample = args.context * (args.layers * (16 * args.dim + 3 * args.heads * args.context) + output)
    elif args.model == "cnn":
        per_sample = 400_000  # two blocks of 32 and 64 channels: unfolded inputs, outputs, Winograd tiles
    else:
        per_sample = 8 * (784 + 512 + 512)
    return 4 * (4 * parameter_count(args, vocab) + 2 * args.batch_size * per_sample)


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


def check_memory(args, vocab=None):
    """DataError when a training step would need more memory than there is (before the model is built)."""
    need, have = step_bytes(args, vocab), available_memory()
    if have is not None and need > have:
        raise DataError(
            f"--batch-size {args.batch_size} needs about {need / 2**30:.1f} GiB a step (an estimate), more than the "
            f"{have / 2**30:.1f} GiB available: use a smaller --batch-size"
        )
