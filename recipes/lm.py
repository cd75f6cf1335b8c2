"""A small decoder-only transformer language model on Tiny Shakespeare, Penn Treebank, WikiText-2 or
your own text, with a SentencePiece (bpe, unigram) or word vocabulary.

    python train.py --task lm [--dataset ptb] [--sample 200]
"""

import math

import mlx.core as mx
import numpy as np

from data import DataError, text
from models.ops import Ops
from models.transformer import Transformer
from recipes import Recipe, digest


class LanguageModel(Recipe):
    """Trained on random windows of --context tokens; evaluated on every validation token (and, after
    the last epoch, every test token) with at least context / 2 tokens before it.

    Metrics: nats per token (the loss), nats per character, and for PTB perplexity per word."""

    unit = "tokens"
    sizes = "--dim, --layers, --vocab-size or --hash-buckets"

    def __init__(self, config, ops: Ops):
        self.context, self.seed, self.per_word = config.context, config.seed, config.dataset == "ptb"
        self.splits = text.load_splits(config.dataset, config.data_dir, config.verify_data == "on")
        self.sp = text.tokenizer(self.splits["train"], config.vocab_size, config.tokenizer, config.cache_dir)
        tokens = {split: text.encode(self.sp, t) for split, t in self.splits.items()}
        self.sp_ids = np.arange(self.sp.vocab_size())  # sp_ids[the model's token id] = SentencePiece's id
        if config.softmax == "class":  # its classes are runs of ids: renumber the vocabulary by training frequency
            self.sp_ids = text.by_frequency(tokens["train"], self.sp.vocab_size())
        self.model_ids = np.argsort(self.sp_ids).astype(np.int32)  # the inverse: model_ids[SentencePiece's id]
        self.tokens = {split: self.model_ids[t] for split, t in tokens.items()}
        if len(self.tokens["valid"]) < config.context + 1:
            raise DataError(
                f"--context {config.context} is longer than the validation split ({len(self.tokens['valid']) - 1} "
                f"tokens): use a smaller --context"
            )
        self.content = {
            "data_sha256": digest(*(t.encode() for t in self.splits.values())),
            "tokenizer_sha256": digest(self.sp.serialized_model_proto()),
        }
        self.batches = text.Windows(self.tokens["train"], config.batch_size, config.context, config.seed)
        self.model = Transformer(
            self.sp.vocab_size(),
            config.context,
            config.layers,
            config.dim,
            config.heads,
            config.dropout,
            config.positions,
            config.softmax,
            ops,
            tied=not config.untied,
            hash_buckets=config.hash_buckets,
        )
        self.layers, self.dim, self.heads, self.class_softmax = config.layers, config.dim, config.heads, config.softmax

    def losses(self, model, inputs, targets):
        return model.nll(inputs, targets)

    def count(self, batch) -> int:
        return batch[1].size

    def evaluate(self, model, final=False):
        metrics = {}
        for split in ["valid"] + (["test"] if final and "test" in self.splits else []):
            nll = 0.0
            for x, y, scored in text.eval_windows(self.tokens[split], self.context):
                nll += np.array(model.nll(mx.array(x), mx.array(y)), np.float64)[scored].sum()  # float64: 10^5 tokens
            prefix = "val" if split == "valid" else "test"
            metrics[f"{prefix}_loss"] = nll / (len(self.tokens[split]) - 1)
            metrics[f"{prefix}_nats_per_char"] = nll / len(self.splits[split])
            if self.per_word:
                metrics[f"{prefix}_word_ppl"] = math.exp(nll / text.word_count(self.splits[split]))
        return metrics, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())

    def sample(self, model, count: int, temperature: float) -> str:
        """`count` tokens drawn from the model at `temperature`, after the beginning-of-text token, as text."""
        model.eval()
        sampled, key = [int(self.model_ids[self.sp.bos_id()])], mx.random.key(self.seed)
        for _ in range(count):
            logits = model(mx.array([sampled[-self.context :]]))[0, -1]
            key, subkey = mx.random.split(key)
            sampled.append(mx.random.categorical(logits / temperature, key=subkey).item())
        return text.decode(self.sp, self.sp_ids[sampled[1:]].tolist())

    def activations_per_sample(self) -> int:
        vocab = self.sp.vocab_size()
        output = 6 * math.isqrt(vocab) if self.class_softmax == "class" else 3 * vocab
        return self.context * (self.layers * (16 * self.dim + 3 * self.heads * self.context) + output)
