"""The language-model recipe: tokenizer, windows, metrics, and train.py --task lm end to end."""

import json
import math
import re
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import train
from data import DataError, text
from models.cpu_ops import causal_attention, softmax_cross_entropy
from models.ops import CPU
from models.transformer import ClassSoftmax
from recipes import lm
from training import options

TINY_MODEL = [
    "--verify-data",
    "off",
    "--task",
    "lm",
    "--dim",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--context",
    "16",
    "--dropout",
    "0.1",
    "--batch-size",
    "8",
    "--vocab-size",
    "300",
]  # dropout: its RNG in the compiled step


def make_text(seed=0, lines=600):
    """Sentences from a small grammar: learnable, with repeated words for BPE to merge."""
    rng = np.random.default_rng(seed)
    subjects, verbs, objects = (
        ["the cat", "a dog", "my king", "thy lord"],
        ["sees", "loves", "fears"],
        ["the moon", "a rose", "gold"],
    )
    return "".join(
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(['.', '!', ' ,'])}\n"
        for _ in range(lines)
    )


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_text())
    return path


def run_lm(tmp_path, *args, name="run"):
    log = tmp_path / f"{name}.jsonl"
    word = "word" in args or ("ptb" in args and "--tokenizer" not in args)  # ptb's default tokenizer is word
    cache = [] if word else ["--cache-dir", str(tmp_path / "cache")]  # a word vocabulary is not cached
    train.main([*TINY_MODEL, *cache, "--log-every", "1", "--log-file", str(log), *args])
    return [json.loads(line) for line in log.read_text().splitlines()]


def losses(records):
    return [(r["step"], r["loss"]) for r in records[1:] if "loss" in r]


# ---------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trips_any_text_and_is_cached(tmp_path, monkeypatch):
    train_text = make_text()
    sp = text.tokenizer(train_text, 300, "bpe", tmp_path)
    for sample in [train_text, "Unseen: é ü 你好 \t  two  spaces\n\nblank lines\n", "x"]:
        assert text.decode(sp, sp.encode(sample)) == sample
    assert len(list(tmp_path.iterdir())) == 1

    import sentencepiece as spm

    def no_training(**kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
    again = text.tokenizer(train_text, 300, "bpe", tmp_path)
    assert again.encode(train_text) == sp.encode(train_text)
    with pytest.raises(AssertionError, match="retrained"):
        text.tokenizer(train_text + "more", 300, "bpe", tmp_path)  # other text: other cache entry


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_training_is_deterministic(tmp_path, model_type):
    a = text.tokenizer(make_text(), 285, model_type, tmp_path / "a")
    b = text.tokenizer(make_text(), 285, model_type, tmp_path / "b")
    assert a.serialized_model_proto() == b.serialized_model_proto()


def test_vocab_size_the_text_cannot_support(tmp_path):
    with pytest.raises(DataError, match=r"--vocab-size 50000 does not fit .*at most \d+"):
        text.tokenizer(make_text(lines=50), 50000, "bpe", tmp_path)
    with pytest.raises(DataError, match=r"--vocab-size 100 does not fit .*at least \d+"):
        text.tokenizer(make_text(lines=50), 100, "bpe", tmp_path)


def test_a_signal_while_the_tokenizer_trains_is_not_a_vocab_size_error(tmp_path):
    """SentencePiece reports whatever its line iterator raised as a RuntimeError; a stop signal's exception,
    raised in the iterator by the signal handler, must come out as itself."""

    class Stop(Exception):
        pass

    class SignalledText(str):  # the signal comes while the trainer reads its sixth line
        def split(self, separator=None):
            yield from super().split(separator)[:5]
            raise Stop

    with pytest.raises(Stop):
        text.tokenizer(SignalledText(make_text()), 300, "bpe", tmp_path)


def ptb_like(seed=0, lines=300):
    """make_text in PTB's layout: a space before every word and before the newline, <unk> for rare words."""
    return "".join(f" {line.replace(' ,', ' <unk>')} \n" for line in make_text(seed, lines).splitlines())


def test_word_tokenizer_keeps_every_word_and_ptb_unk(tmp_path):
    train_text = ptb_like()
    sp = text.tokenizer(train_text, None, "word", tmp_path)
    assert all(sp.piece_to_id("\u2581" + word) != sp.unk_id() for word in set(train_text.split()))
    assert [sp.id_to_piece(i) for i in sp.encode(" the cat <unk> \n")] == [
        "\u2581the",
        "\u2581cat",
        "\u2581<unk>",
        "\u2581\n",
    ]
    for sample in [train_text, " an unseen wörd \n"]:  # unseen words fall back to bytes
        assert text.decode(sp, sp.encode(sample)) == sample


def test_ptb_defaults_to_words_and_a_class_softmax_and_other_text_to_bpe():
    for argv, tokenizer, vocab, softmax in [
        (["--dataset", "ptb"], "word", None, "class"),
        ([], "bpe", 1024, "full"),
        (["--dataset", "ptb", "--tokenizer", "bpe"], "bpe", 1024, "full"),
        (["--dataset", "ptb", "--softmax", "full"], "word", None, "full"),
    ]:
        args = options.parse(["--task", "lm", *argv])
        assert (args.tokenizer, args.vocab_size, args.softmax) == (tokenizer, vocab, softmax)


def test_each_dataset_has_its_recipe_and_flags_override_it():
    # epochs, blocks, warmup, batch, dropout
    recipes = {"tinyshakespeare": (12, 4, 600, 16, 0.0), "ptb": (10, 2, 300, 32, 0.1), "some.txt": (1, 4, 0, 16, 0.0)}
    for dataset, recipe in recipes.items():
        args = options.parse(["--task", "lm", "--dataset", dataset])
        assert (args.epochs, args.layers, args.warmup, args.batch_size, args.dropout) == recipe
    args = options.parse(["--task", "lm", "--dataset", "ptb", "--layers", "2", "--epochs", "9"])
    assert (args.epochs, args.layers) == (9, 2)


# ---------------------------------------------------------------------------------------
# Batches and metrics


def test_windows_are_seeded_shifted_and_resumable():
    tokens = np.arange(1000, dtype=np.int32)
    windows = text.Windows(tokens, batch_size=4, context=8, seed=1)
    x, y = windows.batch(7)
    assert x.shape == y.shape == (4, 8) and x.dtype == np.int32
    np.testing.assert_array_equal(y, x + 1)  # targets are the next tokens
    np.testing.assert_array_equal(windows.batch(7)[0], x)
    assert not np.array_equal(windows.batch(8)[0], x)
    first = [b[0] for b in windows.epoch(2)]
    np.testing.assert_array_equal(np.stack([b[0] for b in windows.epoch(2, start_batch=3)]), np.stack(first[3:]))


@pytest.mark.parametrize(
    "length", [150, 161, 10]
)  # windows that end flush; a last one that overlaps more; one short window
def test_eval_windows_score_every_token_once_with_half_a_context_before_it(length):
    tokens = np.arange(length, dtype=np.int32)
    batches = list(text.eval_windows(tokens, 16, batch_size=4))
    scored_targets = np.concatenate([y[scored] for _, y, scored in batches])
    np.testing.assert_array_equal(np.sort(scored_targets), tokens[1:])  # each once
    for x, y, scored in batches:
        np.testing.assert_array_equal(y, x + 1)
        assert x.shape[1] == min(16, length - 1)
        context_before = np.broadcast_to(np.arange(x.shape[1]), x.shape)[scored] + 1  # tokens up to the target's input
        assert np.all((context_before >= 8) | (y[scored] <= 16))  # only the first window scores with less


def test_softmax_cross_entropy_matches_mlx_loss_and_its_gradient():
    """The full-softmax LM loss (one exp a logit, its own vjp) against nn.losses.cross_entropy and autograd."""
    rng = np.random.default_rng(0)
    logits = mx.array(4 * rng.standard_normal((3, 5, 50)), mx.float32)
    targets = mx.array(rng.integers(0, 50, (3, 5)), mx.int32)
    weights = mx.array(rng.random((3, 5)), mx.float32)  # a cotangent that is not all ones

    def ours(z):
        return (softmax_cross_entropy(z, targets) * weights).sum()

    def reference(z):
        return (nn.losses.cross_entropy(z, targets, reduction="none") * weights).sum()

    # Same math in another order (exps / total against exp(z - logsumexp)): float32 rounding apart.
    np.testing.assert_allclose(
        np.array(softmax_cross_entropy(logits, targets)),
        np.array(nn.losses.cross_entropy(logits, targets, reduction="none")),
        rtol=1e-6,
    )
    grad, ref_grad = mx.grad(ours)(logits), mx.grad(reference)(logits)
    np.testing.assert_allclose(np.array(grad), np.array(ref_grad), atol=1e-7)
    assert np.abs(np.array(grad)).max() > 0.1


@pytest.mark.parametrize("compiled", [False, True])
def test_causal_attention_is_mlx_attention_bit_for_bit(compiled):
    # causal_attention spells out MLX's CPU scaled_dot_product_attention so that mx.compile fuses its
    # exp; the operations are the same, so output and gradients must be the same bits.
    q, k, v, cotangent = (mx.random.normal((2, 3, 17, 8), key=mx.random.key(i)) for i in range(4))
    scale = 1 / math.sqrt(8)

    def ours(q, k, v):
        return (causal_attention(q, k, v, scale) * cotangent).sum()

    def mlx(q, k, v):
        return (mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal") * cotangent).sum()

    ours, mlx = (mx.value_and_grad(f, argnums=(0, 1, 2)) for f in (ours, mlx))
    if compiled:
        ours, mlx = mx.compile(ours), mx.compile(mlx)
    (loss, grads), (mlx_loss, mlx_grads) = ours(q, k, v), mlx(q, k, v)
    assert mx.array_equal(loss, mlx_loss)
    for g, mlx_g in zip(grads, mlx_grads):
        assert mx.array_equal(g, mlx_g)


@pytest.mark.parametrize("vocab", [100, 103])  # 10 classes of 10 words; 11 of 11, the last with 7 and 4 padding
def test_class_softmax_is_a_distribution_and_its_loss_and_gradient_match_it(vocab, seed=0):
    mx.random.seed(seed)  # the class vectors' draw: the same whatever ran before
    rng = np.random.default_rng(seed)
    layer = ClassSoftmax(vocab, 16)
    words = mx.array(rng.standard_normal((vocab, 16)), mx.float32)
    h = mx.array(rng.standard_normal((3, 40, 16)), mx.float32)
    targets = mx.array(rng.integers(0, vocab, (3, 40)), mx.int32)  # unsorted, classes repeated
    targets[0, :4] = mx.array([vocab - 1, 0, vocab - 1, vocab - 2])  # the padded last class, and the first
    weights = mx.array(rng.random((3, 40)), mx.float32)  # a cotangent that is not all ones

    log_probs = layer(h, words)
    assert log_probs.shape == (3, 40, vocab)
    # Sums of ~100 float32 probabilities: rounding, ~1e-7 each.
    np.testing.assert_allclose(np.array(mx.exp(log_probs).sum(axis=-1)), 1.0, atol=1e-5)

    def loss(h, words, layer):  # the cheap path: target classes only
        return (layer.nll(h, targets, words) * weights).sum()

    def dense_loss(h, words, layer):  # every word's probability, then the target's
        return -(mx.take_along_axis(layer(h, words), targets[..., None], -1)[..., 0] * weights).sum()

    # Same sums in another order and grouping (the sorted path, gather_mm): float32 rounding apart.
    np.testing.assert_allclose(
        np.array(layer.nll(h, targets, words)),
        np.array(-mx.take_along_axis(log_probs, targets[..., None], -1)[..., 0]),
        rtol=1e-5,
    )
    grads = mx.grad(loss, argnums=[0, 1])(h, words, layer)
    dense = mx.grad(dense_loss, argnums=[0, 1])(h, words, layer)
    for ours, reference in zip(grads, dense):  # sums over 120 tokens of terms up to ~1: float32 rounding
        np.testing.assert_allclose(np.array(ours), np.array(reference), rtol=1e-5, atol=1e-6)
        assert np.abs(np.array(ours)).max() > 0.1
    class_grad = nn.value_and_grad(layer, lambda layer: loss(h, words, layer))(layer)[1]["classes"]["weight"]
    dense_class_grad = nn.value_and_grad(layer, lambda layer: dense_loss(h, words, layer))(layer)[1]["classes"][
        "weight"
    ]
    np.testing.assert_allclose(np.array(class_grad), np.array(dense_class_grad), rtol=1e-5, atol=1e-6)


def test_by_frequency_and_the_sampled_text_go_through_the_renumbered_vocabulary(tmp_path):
    np.testing.assert_array_equal(text.by_frequency(np.array([2, 2, 2, 0, 3, 3]), 5), [2, 3, 0, 1, 4])  # ties by id
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    for split in ("train", "valid", "test"):
        (ptb / f"ptb.{split}.txt").write_text(ptb_like(seed=len(split)))
    args = options.parse([*TINY_MODEL[:-2], "--dataset", "ptb", "--data-dir", str(tmp_path)])
    assert args.softmax == "class"  # the default for a word vocabulary
    task = lm.LanguageModel(args, CPU)
    assert np.all(np.diff(np.bincount(task.batches.tokens)) <= 0)  # the model sees ids numbered by frequency
    counts = {}
    for word in (ptb / "ptb.train.txt").read_text().replace("\n", " \n ").split(" "):
        counts[word] = counts.get(word, 0) + 1 if word else 0
    second = sorted(counts, key=counts.get)[-2]  # after "\n", one a line

    class SecondMostFrequent(nn.Module):  # certain of the token numbered 1: the second most frequent word
        def __call__(self, tokens):
            return mx.where(mx.arange(task.model.embedding.weight.shape[0]) == 1, 0.0, -1e9) + mx.zeros(
                (*tokens.shape, 1)
            )

    assert task.sample(SecondMostFrequent(), 3, 1.0) == f" {second}" * 3


def test_metrics_by_hand_on_a_uniform_model(tmp_path):
    """A model that predicts uniformly over V tokens has NLL log V per token; the rest is counting."""
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    for split in ("train", "valid", "test"):
        (ptb / f"ptb.{split}.txt").write_text(make_text(seed=len(split)).replace(",", "<unk>"))
    args = options.parse(
        [
            *TINY_MODEL,
            "--dataset",
            "ptb",
            "--tokenizer",
            "bpe",
            "--data-dir",
            str(tmp_path),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    task = lm.LanguageModel(args, CPU)
    vocab = task.model.embedding.weight.shape[0]

    class Uniform(nn.Module):
        def nll(self, tokens, targets):
            return nn.losses.cross_entropy(mx.zeros((*tokens.shape, vocab)), targets, reduction="none")

    metrics, _ = task.evaluate(Uniform(), final=True)
    valid = (ptb / "ptb.valid.txt").read_text()
    sp = text.tokenizer((ptb / "ptb.train.txt").read_text(), 300, "bpe", tmp_path / "cache")
    n_tokens, n_chars = len(sp.encode(valid)), len(valid)
    n_words = len(valid.split()) + valid.count("\n")
    # Each token's float32 log-softmax of zeros is log V to ~1e-7 relative; the sums are float64.
    assert metrics["val_loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert metrics["val_nats_per_char"] == pytest.approx(n_tokens * math.log(vocab) / n_chars, rel=1e-6)
    assert metrics["val_word_ppl"] == pytest.approx(vocab ** (n_tokens / n_words), rel=1e-5)
    assert {"test_loss", "test_nats_per_char", "test_word_ppl"} <= set(metrics)


def test_word_level_ptb_perplexity_is_the_exponential_of_the_token_loss(tmp_path):
    """With one token per word and per line end, PTB's word perplexity is exp(loss per token), exactly."""
    for split in ("train", "valid", "test"):
        (tmp_path / "ptb").mkdir(exist_ok=True)
        (tmp_path / "ptb" / f"ptb.{split}.txt").write_text(ptb_like(seed=len(split)))
    args = options.parse(
        [
            *TINY_MODEL[:-2],
            "--dataset",
            "ptb",
            "--data-dir",
            str(tmp_path),  # [:-2]: no --vocab-size
        ]
    )
    task = lm.LanguageModel(args, CPU)
    metrics, _ = task.evaluate(task.model, final=True)
    for split in ("val", "test"):
        assert metrics[f"{split}_word_ppl"] == pytest.approx(math.exp(metrics[f"{split}_loss"]), rel=1e-12)


# ---------------------------------------------------------------------------------------
# train.py --task lm


def test_a_few_steps_lower_the_loss_and_sample(tmp_path, corpus, capsys):
    records = run_lm(tmp_path, "--dataset", str(corpus), "--steps", "40", "--lr", "0.05", "--sample", "30")
    steps = losses(records)
    assert np.mean([loss for _, loss in steps[-5:]]) < np.mean([loss for _, loss in steps[:5]]) - 0.5
    assert "val_nats_per_char" in records[-1]
    sample = capsys.readouterr().out.strip().splitlines()
    assert sample  # the generated text is printed last


@pytest.mark.parametrize("softmax", ["full", "class"])
def test_lm_compiled_equals_eager(tmp_path, corpus, softmax):
    args = ["--dataset", str(corpus), "--steps", "6", "--warmup", "2", "--softmax", softmax]
    assert losses(run_lm(tmp_path, *args, name="c")) == losses(run_lm(tmp_path, *args, "--no-compile", name="e"))


@pytest.mark.parametrize("streams", ["1", "2"])
def test_lm_resume_equals_uninterrupted(tmp_path, corpus, streams):
    args = ["--dataset", str(corpus), "--epochs", "2", "--streams", streams]
    whole = run_lm(tmp_path, *args, name="whole")
    ckpt = str(tmp_path / "ckpt")
    run_lm(tmp_path, *args, "--steps", "7", "--checkpoint-dir", ckpt, name="part")
    resumed = run_lm(tmp_path, *args, "--checkpoint-dir", ckpt, "--resume", name="part")
    assert losses(resumed) == losses(whole)
    untimed = lambda record: {k: v for k, v in record.items() if k != "elapsed_s"}  # noqa: E731
    assert untimed(resumed[-1]) == untimed(whole[-1])


def test_lm_evaluates_every_eval_every_epochs_and_after_the_last(tmp_path, corpus):
    args = ["--dataset", str(corpus), "--epochs", "3", "--eval-every", "2"]
    whole = run_lm(tmp_path, *args, name="whole")
    evaluations = [r for r in whole[1:] if "val_loss" in r]
    assert [r["epoch"] for r in evaluations] == [2, 3]
    per_epoch = evaluations[0]["step"] // 2
    ckpt = str(tmp_path / "ckpt")  # stopped just past the first, unevaluated, epoch
    run_lm(tmp_path, *args, "--steps", str(per_epoch + 1), "--checkpoint-dir", ckpt, name="part")
    resumed = run_lm(tmp_path, *args, "--checkpoint-dir", ckpt, "--resume", name="part")
    assert losses(resumed) == losses(whole)
    untimed = lambda record: {k: v for k, v in record.items() if k != "elapsed_s"}  # noqa: E731
    assert untimed(resumed[-1]) == untimed(whole[-1])


def test_checkpoint_with_another_output_layer_is_refused(tmp_path, corpus, capsys):
    ckpt = str(tmp_path / "ckpt")
    run_lm(tmp_path, "--dataset", str(corpus), "--steps", "2", "--checkpoint-dir", ckpt)
    capsys.readouterr()  # the run's own output
    error = one_line_error(
        capsys,
        [
            *TINY_MODEL,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--dataset",
            str(corpus),
            "--softmax",
            "class",
            "--checkpoint-dir",
            ckpt,
            "--resume",
        ],
    )
    assert "another run configuration" in error and "softmax='full' (now 'class')" in error


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:")
    return err[0]


def test_bad_lm_inputs_give_one_line_errors(tmp_path, corpus, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    cases = [
        (["--dataset", str(empty)], "holds no text"),
        (["--dataset", str(tmp_path / "missing.txt")], "does not exist"),
        (["--dataset", "penn"], "unknown dataset 'penn'"),
        (["--dataset", str(corpus), "--vocab-size", "100000"], "--vocab-size 100000 does not fit"),
        (["--dataset", str(corpus), "--context", "100000"], "longer than the validation split"),
        (["--dataset", str(corpus), "--dim", "30", "--heads", "4"], "multiple of --heads"),
        (["--dataset", str(corpus), "--model", "mlp"], "does not fit --task lm"),
    ]
    for args, message in cases:
        assert re.search(message, one_line_error(capsys, [*TINY_MODEL, *cache, *args]))


def test_wikitext2_offline_fails_fast(tmp_path, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(text, "hub_reachable", lambda: False)  # as on a machine without network
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # and nothing cached
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)  # restored afterwards
    start = time.perf_counter()
    error = one_line_error(capsys, [*TINY_MODEL, "--dataset", "wikitext-2"])
    assert "Hugging Face hub" in error and "--dataset PATH" in error
    assert time.perf_counter() - start < 5


def test_wikitext2_hub_records_become_splits():
    """The conversion applied to the hub's DatasetDict, on one built here in its format (lines with newlines)."""
    import datasets

    lines = {"train": [" = Title = \n", " Some text .\n"], "validation": [" Valid .\n"], "test": ["", " Test .\n"]}
    loaded = datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in lines.items()})
    assert text.splits_from_hub(loaded) == {
        "train": " = Title = \n Some text .\n",
        "valid": " Valid .\n",
        "test": " Test .\n",
    }


@pytest.mark.parametrize("dataset", ["tinyshakespeare", "ptb"])
def test_real_text_short_run(tmp_path, dataset, real_data):
    data_dir = real_data(dataset)
    records = run_lm(
        tmp_path,
        "--dataset",
        dataset,
        "--data-dir",
        str(data_dir),
        "--vocab-size",
        "512",
        "--dim",
        "64",
        "--context",
        "32",
        "--batch-size",
        "16",
        "--steps",
        "60",
        "--lr",
        "0.05",
    )
    final = records[-1]
    # A uniform guess over 512 tokens costs log(512) = 6.24 nats a token; 60 small steps already
    # learn the unigram statistics, which takes the loss well below that.
    assert final["val_loss"] < 5.5
    assert ("test_word_ppl" in final) == (dataset == "ptb")


def test_rowwise_embeddings_keep_one_accumulator_per_token(tmp_path, corpus):
    ckpt = tmp_path / "ckpt"
    run_lm(tmp_path, "--dataset", str(corpus), "--steps", "4", "--rowwise-embeddings", "--checkpoint-dir", str(ckpt))
    saved = mx.load(str(ckpt / "checkpoint.safetensors"))
    vocab, dim = saved["model.embedding.weight"].shape
    assert saved["optimizer.embedding.weight.v_row"].shape == (vocab, 1) and dim == 32
    assert "optimizer.embedding.weight.v" not in saved and any(k.endswith(".v") for k in saved)  # the rest stays dense


def test_the_memory_check_counts_the_built_model_and_refuses_what_does_not_fit(tmp_path, corpus, monkeypatch):
    """The estimate counts the parameters of the model as built (16 bytes each: the weight, its
    gradient, state and update), and a step that needs more than there is stops before training."""
    import recipes

    def recipe(*extra):
        argv = [*TINY_MODEL, "--dataset", str(corpus), "--cache-dir", str(tmp_path / "cache"), *extra]
        return lm.LanguageModel(options.parse(argv), CPU)

    plain, hashed = recipe(), recipe("--hash-buckets", "77")
    assert hashed.step_bytes(8) - plain.step_bytes(8) == 16 * 77 * hashed.model.bigrams.weight.shape[1]
    monkeypatch.setattr(recipes, "available_memory", lambda: plain.step_bytes(8))
    plain.check_memory(8)  # exactly enough
    with pytest.raises(DataError, match=r"--batch-size 9 needs about .* use a smaller --batch-size"):
        plain.check_memory(9)
    monkeypatch.setattr(recipes, "available_memory", lambda: plain.model_bytes() - 1)  # no batch fits
    with pytest.raises(DataError, match=r"the model needs about .* make --dim, --layers, --vocab-size or --hash"):
        plain.check_memory(1)
