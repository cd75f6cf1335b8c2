"""The one door every path of a run goes through before any work: what it reads (data, a text file
or folder, a --reproduce log) and writes (--log-file, --checkpoint-dir, --cache-dir, the data folder
downloads fill), and the folders it relies on ($HOME, $TMPDIR). Each fault is one PathError naming
the path and the fix: a name too long for the filesystem, a FIFO, device or socket where a file
belongs, a folder where a file belongs and the reverse, a parent that is a file, a log that would
land on another run's files."""

import os
import stat
from pathlib import Path

from data import mnist
from data.text import DATASETS
from training.checkpoint import FILES

CHECKPOINT_FILES = (*FILES, ".lock")


class PathError(Exception):
    """A path a run cannot use; the message names it and the fix."""


def check(config):
    """PathError for the first path of `config` (or the environment) that cannot work as used."""
    environment_folder("HOME")
    environment_folder("TMPDIR")
    if config.reproduce:
        existing_file(config.reproduce, "--reproduce")
    if config.task == "lm" and config.dataset not in DATASETS:
        text_source(config.dataset)
    if config.task == "mnist":
        mnist.check_name(config.dataset)
    if config.task == "mnist" or config.dataset in DATASETS:
        folder(config.data_dir, "--data-dir")
    if config.checkpoint_dir:
        folder(config.checkpoint_dir, "--checkpoint-dir")
    if config.task == "lm" and config.tokenizer != "word":
        folder(config.cache_dir, "--cache-dir")
    if config.log_file:
        log_file(config.log_file, config.checkpoint_dir, config.dataset)


def environment_folder(name: str):
    """$HOME or $TMPDIR, where set: an absolute path of an existing folder (MLX builds its kernels in
    $TMPDIR; caches live under $HOME)."""
    value = os.environ.get(name)
    if value is None:
        return
    fix = f"set {name} to an existing folder, or unset it"
    if not value or not os.path.isabs(value):
        raise PathError(f"${name} is {value!r}, not an absolute path: {fix}")
    lengths(Path(value), f"${name}")
    if not os.path.isdir(value):
        raise PathError(f"${name} is {value}, which is not an existing folder: {fix}")
    if not os.access(value, os.W_OK | os.X_OK):
        raise PathError(f"${name} is {value}, which this user cannot write: {fix}")


def lengths(path: Path, flag: str):
    """PathError when a part of `path` or the whole is longer than the filesystem takes."""
    limit = _limit(path, "PC_NAME_MAX", 255)
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise PathError(
                f"{flag} {_short(path)}: the name {_short(part)} is {len(os.fsencode(part))} bytes, longer than "
                f"the {limit} its filesystem takes: choose a shorter name"
            )
    whole = _limit(path, "PC_PATH_MAX", 4096)
    if len(os.fsencode(str(path.absolute()))) >= whole:
        raise PathError(f"{flag} {_short(path)} is longer than the {whole} bytes a path may have: choose a shorter one")


def kind(path: Path, flag: str) -> str | None:
    """'file', 'folder', 'FIFO', 'device', 'socket' (following links), or None where nothing is."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise PathError(
            f"{flag} {_short(path)}: {_first_file_above(path)} is a file, not a folder: fix the path"
        ) from None
    except OSError as e:
        raise PathError(f"cannot use {flag} {_short(path)} ({e.strerror}): check the path") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"


def existing_file(path: Path, flag: str):
    lengths(Path(path), flag)
    found = kind(Path(path), flag)
    if found is None:
        raise PathError(f"{flag} {path} does not exist: check the path")
    if found != "file":
        raise PathError(f"{flag} {path} is a {found}, not a file: name a file")


def text_source(dataset: str):
    """--dataset PATH: a text file or a folder of them (a missing one is DataError's, which names the data sets)."""
    path = Path(dataset)
    lengths(path, "--dataset")
    found = kind(path, "--dataset")
    if found not in (None, "file", "folder"):
        raise PathError(f"--dataset {path} is a {found}, not a text file or folder: name a .txt file or a folder")


def folder(path: Path, flag: str):
    """A folder the run writes in, or creates: not a file, nor under one."""
    path = Path(path)
    lengths(path, flag)
    found = kind(path, flag)
    if found not in (None, "folder"):
        raise PathError(f"{flag} {path} is a {found}, not a folder: name a folder")
    _parent_is_a_folder(path, flag)


def log_file(path: Path, checkpoint_dir, dataset):
    """--log-file: a regular file (or none yet) in a folder, that is none of the run's inputs and
    no file of a checkpoint folder (this run's or another's)."""
    path = Path(path)
    lengths(path, "--log-file")
    found = kind(path, "--log-file")
    if found not in (None, "file"):
        raise PathError(f"--log-file {path} is a {found}, not a file: name a file")
    _parent_is_a_folder(path, "--log-file")
    target = path.resolve()
    if checkpoint_dir is not None and target == Path(checkpoint_dir).resolve():
        raise PathError(f"--log-file {path} is the --checkpoint-dir: name a file of its own")
    if target.name in CHECKPOINT_FILES or (target.parent / CHECKPOINT_FILES[0]).exists():
        if checkpoint_dir is None or target.parent != Path(checkpoint_dir).resolve() or target.name in CHECKPOINT_FILES:
            raise PathError(
                f"--log-file {path} would write over a checkpoint folder's files ({target}): name a log of its own"
            )
    if found == "file" and Path(dataset).exists() and target == Path(dataset).resolve():
        raise PathError(f"--log-file {path} is the --dataset it trains on: name another file")


def _parent_is_a_folder(path: Path, flag: str):
    above = _first_file_above(path)
    if above is not None:
        raise PathError(f"{flag} {path}: {above} is a file, not a folder: fix the path")


def _first_file_above(path: Path):
    """The first existing ancestor of `path` that is not a folder, if any."""
    for parent in reversed(Path(path).absolute().parents):
        try:
            if not parent.is_dir():
                return parent if parent.exists() else None
        except OSError:
            return parent
    return None


def _limit(path: Path, name: str, default: int) -> int:
    for parent in [Path(path).absolute(), *Path(path).absolute().parents]:
        try:
            return os.pathconf(parent, name)
        except (OSError, ValueError):
            continue
    return default


def _short(text) -> str:
    text = str(text)
    return text if len(text) <= 80 else f"{text[:40]}...{text[-20:]}"
