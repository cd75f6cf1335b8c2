"""train.py's options, each in one place: its type and range, its default (a constant, or one per
recipe), the task or optimizer it applies to, and its help. --help, the checks, the defaults and what
identifies a run for --resume all derive from OPTIONS. Why the defaults: docs/defaults.md.
"""

import argparse
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from training import cpu_tuning

OPTIMIZERS = ["adagrad", "mlx-adagrad", "adagrad-da", "sgd", "adam", "adamw"]
# A run stops when its loss is not finite or exceeds this many times its first step's.
DIVERGED = 1000
# Groups of options that say how to run, not what is trained: a checkpoint resumes under other values of these.
HOW_TO_RUN = ("run", "device")


class OptionError(Exception):
    """Options that cannot work; the message names the option and the fix."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option raises OptionError (one line, from main) instead of printing usage."""

    def error(self, message):
        # "argument --lr: must be > 0, got 0" -> "--lr must be > 0, got 0"
        message = re.sub(r"^argument (-[\w-]+)(/[\w-]+)?: (must|expected|is)", r"\1 \3", message)
        raise OptionError(re.sub(r"^argument (-[\w-]+)(/[\w-]+)?:", r"\1:", message) + " (see python train.py --help)")


# ---------------------------------------------------------------------------------------
# Types: each parses one value and checks its range, so a bad value is refused by argparse.


LARGEST = 2**31 - 1  # step counts, sizes and widths: what MLX's int32 indices hold
FLOAT32 = np.finfo(np.float32)  # the dtype MLX computes every float option in


def number(kind, low=None, high=None, low_open=False, high_open=False):
    """A parser for `kind` values in [low, high] (an open end with *_open). Floats are checked as
    float32 holds them: finite, and either 0 or a normal number (a smaller one is 0 on a GPU and
    rounds to 0 in an update)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if kind is float and abs(value) > float(FLOAT32.max):
            raise argparse.ArgumentTypeError(f"must be finite in float32 (at most {FLOAT32.max:.3g}), got {text}")
        if kind is float and 0 < abs(value) < float(FLOAT32.tiny):
            smallest = f"{'' if low == 0 and low_open else '0 or '}at least {FLOAT32.tiny:.3g}"
            raise argparse.ArgumentTypeError(f"is 0 or subnormal in float32, MLX's dtype: use {smallest}, got {text}")
        held = float(np.float32(value)) if kind is float else value  # the range holds for what MLX computes with
        too_low = low is not None and (held <= low if low_open else held < low)
        too_high = high is not None and (held >= high if high_open else held > high)
        if too_low or too_high:
            if high is not None and (too_high or high < LARGEST):
                bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            else:
                bound = f"{'>' if low_open else '>='} {low}"
            rounded = f", {held:g} in float32" if held != value else ""
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}{rounded}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = number(int, 0, LARGEST, low_open=True)
COUNT = number(int, 0, LARGEST)
POSITIVE = number(float, 0, low_open=True)
REGULARISER = number(float, 0, 10)  # stronger pulls every weight to 0 within a few steps
FRACTION = number(float, 0, 1, high_open=True)
SEED = number(int, 0, 2**63 - 1)  # mx.random.seed takes an unsigned 64-bit value


def text(value: str) -> str:
    """A non-empty string that is valid text (a command line can hold bytes that are not)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"is not valid UTF-8 text: {value!r}") from None
    return value


def path(value: str) -> Path:
    return Path(text(value))


@dataclass(frozen=True)
class PerRecipe:
    """A default chosen by the values of other options: values[config.by[0]][config.by[1]]... (as
    deep as the table goes), else `otherwise`. Options are resolved in table order, so `by` names
    options listed earlier."""

    by: tuple
    values: dict
    otherwise: object = None  # None: a combination the table lacks is an OptionError, not a silent None

    def __call__(self, config):
        value = self.values
        for name in self.by:
            if not isinstance(value, dict):
                break
            if getattr(config, name) not in value:
                if self.otherwise is None:
                    raise LookupError(" ".join(f"{BY_NAME[n].flags} {getattr(config, n)}" for n in self.by))
                return self.otherwise
            value = value[getattr(config, name)]
        return value

    def __str__(self):
        def flat(values, prefix=""):
            for key, value in values.items():
                yield from flat(value, f"{prefix}{key} ") if isinstance(value, dict) else [f"{prefix}{key}: {value}"]

        shown = ", ".join(flat(self.values))
        return shown + (f", otherwise {self.otherwise}" if self.otherwise is not None else "")


@dataclass(frozen=True)
class FromEnvironment:
    """A default read when the options are parsed: `read()`, described as `text`."""

    text: str
    read: object

    def __call__(self, config):
        return self.read()

    def __str__(self):
        return self.text


def default_data_dir() -> Path:
    return Path(os.environ.get("MLX_ADAGRAD_DATA") or Path.home() / ".cache" / "mlx-adagrad")


def default_device() -> str:
    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


@dataclass(frozen=True)
class Applies:
    """Where an option applies: for these values of the option `by`."""

    by: str
    values: tuple

    def __call__(self, config):
        return getattr(config, self.by) in self.values

    def refuse(self, flags, config):
        allowed = ", ".join(self.values[:-1]) + (" or " if len(self.values) > 1 else "") + self.values[-1]
        return f"{flags} is an option of {BY_NAME[self.by].flags} {allowed}, not {getattr(config, self.by)}"


@dataclass(frozen=True)
class Given:
    """An option that takes effect only when one of the options `by` is set."""

    by: tuple

    def __call__(self, config):
        return any(getattr(config, name) for name in self.by)

    def refuse(self, flags, config):
        needed = " or ".join(BY_NAME[name].flags for name in self.by)
        return f"{flags} needs {needed}, without which it does nothing: add {needed.split(' or ')[0]} or drop {flags}"


ADAGRAD = Applies("optimizer", ("adagrad",))
PROXIMAL = Applies("optimizer", ("adagrad", "adagrad-da"))
EPSILON = Applies("optimizer", ("adagrad", "mlx-adagrad", "adagrad-da", "adam", "adamw"))
DECAY = Applies("optimizer", ("adagrad", "sgd", "adamw"))
MNIST = Applies("task", ("mnist",))
LM = Applies("task", ("lm",))
ON_CPU = Applies("device", ("cpu",))
TUNED = Applies("cpu_tuning", ("on",))
TRAINED_TOKENIZER = Applies("tokenizer", ("bpe", "unigram"))


@dataclass(frozen=True)
class Option:
    flags: str
    group: str
    help: str
    type: object = None
    default: object = None  # a value, or PerRecipe; shown in --help
    choices: tuple = None
    flag: bool = False  # store_true
    applies: tuple = ()  # Applies that must all hold for the option to be set
    extra: dict = field(default_factory=dict)

    @property
    def dest(self):
        return self.flags.lstrip("-").replace("-", "_")


LEARNING_RATES = {
    "mlp": {"adagrad": 0.01, "mlx-adagrad": 0.01, "adagrad-da": 0.01, "sgd": 0.05, "adam": 1e-3, "adamw": 1e-3},
    "cnn": {"adagrad": 0.03, "mlx-adagrad": 0.03, "adagrad-da": 0.01, "sgd": 0.05, "adam": 1e-3, "adamw": 1e-3},
    "transformer": {"adagrad": 0.06, "mlx-adagrad": 0.06, "adagrad-da": 0.02, "sgd": 0.3, "adam": 2e-3, "adamw": 2e-3},
}
WORD_LEVEL = ("word",)

# fmt: off
OPTIONS = [
    # What is trained: these identify a run (a checkpoint resumes only under the same values).
    Option("--task", "recipe", "what to train", text, "mnist", choices=("mnist", "lm")),
    Option("--dataset", "recipe", "mnist | fashion-mnist; tinyshakespeare | ptb | wikitext-2 | PATH of a .txt file or "
           "a folder of them", text, PerRecipe(("task",), {"mnist": "mnist", "lm": "tinyshakespeare"})),
    Option("--model", "recipe", "mlp or cnn for mnist, transformer for lm", text,
           PerRecipe(("task",), {"mnist": "mlp", "lm": "transformer"}), choices=("mlp", "cnn", "transformer")),
    Option("--optimizer", "recipe", "adagrad: adagrad.py; mlx-adagrad: mlx.optimizers.Adagrad; adagrad-da: "
           "adagrad_da.py; sgd: momentum 0.9", text, "adagrad", choices=tuple(OPTIMIZERS)),
    Option("--lr", "recipe", f"learning rate; a run stops when its loss is not finite or over {DIVERGED}x its "
           "first step's", POSITIVE, PerRecipe(("model", "optimizer"), LEARNING_RATES)),
    Option("--eps", "recipe", "epsilon of adagrad, adagrad-da, adam, adamw, in (0, 1] (default: the optimizer's, "
           "1e-8)", number(float, 0, 1, low_open=True), applies=(EPSILON,)),
    Option("--initial-accumulator-value", "recipe", "adagrad: v starts here, in [0, 1e6]", number(float, 0, 1e6), 0.0,
           applies=(ADAGRAD,)),
    Option("--lr-decay", "recipe", "adagrad: lr / (1 + (t-1) lr_decay), in [0, 1]", number(float, 0, 1), 0.0,
           applies=(ADAGRAD,)),
    Option("--momentum", "recipe", "adagrad: heavy-ball momentum on its step, in [0, 1) (not with --l1, --l2, "
           "--sparse-embeddings)", FRACTION, 0.0, applies=(ADAGRAD,)),
    Option("--weight-decay", "recipe", "adagrad, sgd: L2 on g; adamw: decoupled; in [0, 10]", REGULARISER, 0.0,
           applies=(DECAY,)),
    Option("--l1", "recipe", "adagrad: proximal L1; adagrad-da: its L1; in [0, 10]", REGULARISER, 0.0,
           applies=(PROXIMAL,)),
    Option("--l2", "recipe", "adagrad, adagrad-da: proximal L2, in [0, 10]", REGULARISER, 0.0, applies=(PROXIMAL,)),
    Option("--rowwise-embeddings", "recipe", "adagrad: one accumulator per embedding row", flag=True,
           applies=(LM, ADAGRAD)),
    Option("--sparse-embeddings", "recipe", "adagrad, lm: update only the input embedding rows a batch looked up "
           "(adagrad_sparse.SparseEmbedding); implies --untied", flag=True, applies=(LM, ADAGRAD)),
    Option("--schedule", "recipe", "learning rate over --epochs", text, "cosine", choices=("constant", "cosine")),
    Option("--warmup", "recipe", "linear warmup steps", COUNT,
           PerRecipe(("dataset",), {"tinyshakespeare": 600, "ptb": 300, "wikitext-2": 600}, otherwise=0)),
    Option("--batch-size", "recipe", "samples (mnist) or windows (lm) a step", POSITIVE_INT,
           PerRecipe(("task", "dataset"), {"mnist": 128, "lm": {"ptb": 32}}, otherwise=16)),
    Option("--epochs", "recipe", "passes over the training data (an lm epoch is ~1 pass)", number(int, 1, 10**5),
           PerRecipe(("model", "dataset"), {"mlp": 24, "cnn": 20, "transformer": {"tinyshakespeare": 12, "ptb": 10}},
                     otherwise=1)),
    Option("--seed", "recipe", "seed of the initial weights, data order and dropout", SEED, 0),
    Option("--dropout", "recipe", "dropout probability", FRACTION,
           PerRecipe(("model", "dataset"), {"mlp": 0.1, "cnn": 0.5, "transformer": {"ptb": 0.1}}, otherwise=0.0)),
    Option("--augment-shift", "mnist", "shift training images by up to N pixels", COUNT,
           PerRecipe(("model",), {"mlp": 1, "cnn": 2}, otherwise=0), applies=(MNIST,)),
    Option("--layers", "lm", "transformer blocks, in [1, 1024]",
           number(int, 1, 1024),
           PerRecipe(("dataset",), {"ptb": 2}, otherwise=4), applies=(LM,)),
    Option("--dim", "lm", "model width", POSITIVE_INT, 128, applies=(LM,)),
    Option("--heads", "lm", "attention heads", POSITIVE_INT, 4, applies=(LM,)),
    Option("--context", "lm", "tokens per training window", POSITIVE_INT, 64, applies=(LM,)),
    Option("--positions", "lm", "rope or learned position embeddings", text, "rope", choices=("rope", "learned"),
           applies=(LM,)),
    Option("--untied", "lm", "give the output layer its own word vectors", flag=True, applies=(LM,)),
    Option("--hash-buckets", "lm", "add a hashed-bigram input table of N rows (0: none)", number(int, 0, 2**31 - 1),
           0, applies=(LM,)),
    Option("--tokenizer", "lm", "bpe, unigram or word", text, PerRecipe(("dataset",), {"ptb": "word"}, "bpe"),
           choices=("bpe", "unigram", "word"), applies=(LM,)),
    Option("--vocab-size", "lm", "tokens of a bpe or unigram vocabulary (word: every training word)",
           number(int, 2), PerRecipe(("tokenizer",), {"word": None}, 1024), applies=(LM,)),
    Option("--softmax", "lm", "class: p(word) = p(class) p(word | class)", text,
           PerRecipe(("tokenizer",), {"word": "class"}, "full"), choices=("full", "class"), applies=(LM,)),
    # How to run: a checkpoint resumes under other values of these.
    Option("--steps", "run", "stop after this many steps in all (the schedule spans --epochs)", POSITIVE_INT),
    Option("--data-dir", "run", "where the data sets are", path,
           FromEnvironment("$MLX_ADAGRAD_DATA, else ~/.cache/mlx-adagrad", default_data_dir)),
    Option("--verify-data", "run", "check local data files against the originals' sha256 (off: train on your own "
           "files of the same names)", text, "on", choices=("on", "off")),
    Option("--cache-dir", "run", "where trained bpe and unigram tokenizers are kept", path,
           FromEnvironment("~/.cache/mlx-adagrad-tokenizers", lambda: Path.home() / ".cache/mlx-adagrad-tokenizers"),
           applies=(LM, TRAINED_TOKENIZER)),
    Option("--log-file", "run", "JSONL: a header line, then step and evaluation lines", path),
    Option("--log-every", "run", "log the mean training loss every N steps", POSITIVE_INT, 10),
    Option("--eval-every", "run", "evaluate every N epochs, and after the last", POSITIVE_INT,
           PerRecipe(("task",), {"lm": 2}, otherwise=1)),
    Option("--checkpoint-dir", "run", "save checkpoints here, every --checkpoint-every steps and last", path),
    Option("--checkpoint-every", "run", "steps between checkpoints", POSITIVE_INT, 1000,
           applies=(Given(("checkpoint_dir",)),)),
    Option("--resume", "run", "continue from the checkpoint in --checkpoint-dir", flag=True,
           applies=(Given(("checkpoint_dir",)),)),
    Option("--overwrite", "run", "start over in a --checkpoint-dir that holds a checkpoint, or on an existing "
           "--log-file (otherwise refused)", flag=True, applies=(Given(("checkpoint_dir", "log_file")),)),
    Option("--reproduce", "run", "rerun the run LOG records for --reproduce-steps steps and compare every logged "
           "value; exit 1 on a mismatch", path, extra={"metavar": "LOG"}),
    Option("--reproduce-steps", "run", "steps --reproduce reruns", POSITIVE_INT, 20, applies=(Given(("reproduce",)),)),
    Option("--sample", "run", "print N tokens sampled from the model at the end", COUNT, 0, applies=(LM,)),
    Option("--temperature", "run", "of --sample, in [0.01, 100]", number(float, 0.01, 100), 0.8,
           applies=(LM, Given(("sample",)))),
    Option("--device", "device", "where the step runs", text, FromEnvironment("MLX's default device", default_device),
           choices=("cpu", "gpu")),
    Option("--no-compile", "device", "run the step eagerly (same bits, slower)", flag=True),
    Option("--stock-ops", "device", "MLX's own attention, cross-entropy, conv and pooling on the CPU too, as on a GPU "
           "(not the CPU formulations of models/ops.py)", flag=True, applies=(ON_CPU,)),
    Option("--cpu-tuning", "device", "training/cpu_tuning.py on a Linux CPU (off: MLX as it comes)", text,
           FromEnvironment("on, unless MLX_ADAGRAD_CPU_TUNING=off", lambda: "on" if cpu_tuning.default_on() else "off"),
           choices=("on", "off")),
    Option("--blas-threads", "device", "OpenBLAS threads (more vary the last bits from run to run)", POSITIVE_INT, 1,
           applies=(ON_CPU, TUNED)),
    Option("--streams", "device", "CPU only: split each batch over N threads (reproducible, other last bits than 1)",
           POSITIVE_INT, PerRecipe(("device", "task"), {"cpu": {"lm": 2}}, otherwise=1), applies=(ON_CPU,)),
]
# fmt: on
BY_NAME = {option.dest: option for option in OPTIONS}
IDENTITY = [option.dest for option in OPTIONS if option.group not in HOW_TO_RUN]
# What --reproduce takes from its own command line; the rest comes from the log it reruns.
REPRODUCE_TAKES = ("reproduce", "reproduce_steps", "data_dir", "verify_data", "device", "stock_ops", "cpu_tuning")


def build_parser(description=None):
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for option in OPTIONS:
        group = groups.get(option.group) or groups.setdefault(
            option.group, parser if option.group == "recipe" else parser.add_argument_group(option.group)
        )
        shown = option.default if option.default is not None else "none"
        help_text = option.help if "default" in option.help else f"{option.help} (default: {shown})"
        if option.flag:
            group.add_argument(option.flags, action="store_true", default=None, help=f"{option.help} (default: off)")
        else:
            group.add_argument(option.flags, type=option.type, choices=option.choices, help=help_text, **option.extra)
    return parser


def parse(argv=None, description=None):
    """The options of a command line, each checked, with every default filled in."""
    return complete(vars(build_parser(description).parse_args(argv)), given=True)


def complete(values: dict, given: bool = False):
    """An argparse.Namespace of every option: `values` (None: not set), the rest their defaults.

    given=True checks that each set option applies to the recipe (a recorded run's config was
    checked when it ran). Raises OptionError."""
    config = argparse.Namespace(**{option.dest: values.get(option.dest) for option in OPTIONS})
    for option in OPTIONS:
        if getattr(config, option.dest) is None:
            try:
                default = option.default(config) if callable(option.default) else option.default
            except LookupError as e:
                raise OptionError(f"{option.flags} has no default for {e.args[0]}: give {option.flags}") from None
            setattr(config, option.dest, False if option.flag else default)
    config.untied = config.untied or config.sparse_embeddings  # a frozen sparse table cannot be tied to the output
    if given:
        set_here = [option for option in OPTIONS if values.get(option.dest) not in (None, False)]
        for option in set_here:
            for applies in option.applies:
                if not applies(config):
                    raise OptionError(applies.refuse(option.flags, config))
        ignored = (
            [option.flags for option in set_here if option.dest not in REPRODUCE_TAKES] if config.reproduce else []
        )
        if ignored:
            raise OptionError(
                f"{ignored[0]} does nothing with --reproduce, which reruns the options its log records: drop it "
                f"(--reproduce takes {', '.join(BY_NAME[name].flags for name in REPRODUCE_TAKES[1:])})"
            )

    check(config)
    return config


def check(config):
    """OptionError for values that cannot work together."""
    if (config.task == "lm") != (config.model == "transformer"):
        raise OptionError(
            f"--model {config.model} does not fit --task {config.task}: mnist takes mlp or cnn, lm takes transformer"
        )
    if config.dim % config.heads:
        raise OptionError(f"--dim {config.dim} must be a multiple of --heads {config.heads}")
    if config.task == "lm" and config.positions == "rope" and config.dim // config.heads % 2:
        raise OptionError(
            f"--dim {config.dim} / --heads {config.heads} gives each head {config.dim // config.heads} dims; RoPE "
            "rotates pairs, so it needs an even number: change --dim or --heads, or use --positions learned"
        )
    if config.resume and config.overwrite:
        raise OptionError("--resume continues a run and --overwrite starts it over: choose one")
    if config.momentum and (config.l1 or config.l2 or config.sparse_embeddings):
        raise OptionError(
            "--momentum has no proximal or sparse step: drop --momentum, or --l1, --l2 and --sparse-embeddings"
        )
