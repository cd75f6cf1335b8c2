"""Checkpoints: model, optimizer state, RNG key, data position and config in one safetensors file.

<dir>/checkpoint.safetensors holds arrays "model.*", "optimizer.*", "rng.keys" (one RNG key
per process) and, in its metadata, the JSON run state and a CRC-32 of every array (checked on
load); <dir>/checkpoint.json repeats that JSON
for people. Both are written to a temporary file and renamed, so a crash never leaves half a
file, and only parameters that are all finite are saved. A run holds <dir>/.lock (an OS file
lock, released when the process ends, however it ends) so that two runs never share a folder.
Data-parallel processes hold equal weights and optimizer state, so only rank 0 writes; to resume
on several machines, --checkpoint-dir must be a folder they all see.
"""

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

# Version 4 stores a checksum of the run state too; 3 of every array; 2 of none (its arrays are checked finite on
# load); 1 had nn.Linear's (out, in) weights, which a square layer would load silently transposed.
FORMAT = 4
READABLE = (2, 3, 4)
# Bytes per element of each safetensors dtype, to check a header's sizes before anything is allocated.
ITEM_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4,
             "U64": 8, "I64": 8, "F64": 8, "C64": 8}  # fmt: skip
LARGEST_HEADER = 100 << 20
FILES = ("checkpoint.safetensors", "checkpoint.json")
RUN_STATE = {"step": int, "epoch": int, "batch": int, "config": dict}


class CheckpointError(Exception):
    """A checkpoint that cannot be used or written; the message says why and what to do."""


@dataclass
class RunState:
    """Where a run stands: all a resumed run needs to log exactly what the uninterrupted one would."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch of the next batch (0-based)
    batch: int = 0  # the next batch's index in its epoch
    window: list = field(default_factory=list)  # training losses since the last logged mean
    first_loss: float | None = None  # the first step's, which divergence is measured against
    last_loss: float | None = None  # the last step's, printed with each evaluation
    run_id: str = ""  # names the run in its checkpoint and in its log's header
    pending_eval: int | None = None  # an epoch (1-based) trained but not yet evaluated
    log_lines: int = 0  # lines of the log written by then
    elapsed_s: float = 0.0  # training time so far, across resumes

    def roll_over(self, batches_per_epoch: int):
        """Once an epoch's last batch is done, stand at the start of the next; an epoch logs only its
        own losses, so those not yet logged are dropped."""
        if self.batch == batches_per_epoch:
            self.epoch, self.batch, self.window = self.epoch + 1, 0, []

    def to_json(self, batches_per_epoch: int) -> dict:
        """As saved: an epoch whose last batch is done is saved as the start of the next."""
        saved = dataclasses.replace(self, window=list(self.window))
        saved.roll_over(batches_per_epoch)
        return dataclasses.asdict(saved)

    @classmethod
    def from_json(cls, saved: dict):
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


def claim(directory, resume: bool, overwrite: bool, log_file=None):
    """Make `directory` this run's: create it, lock it, check that it can be written, remove what an
    interrupted save left, and refuse to start over a checkpoint unless resuming or told to overwrite.
    A new run is refused a folder that holds anything this program did not write (but the run's own
    `log_file`) unless told to overwrite, and even then only this program's files are replaced.

    Returns the open lock file; keep it for the whole run (closing it releases the folder).
    """
    directory = Path(directory)
    if resume and not (directory / FILES[0]).exists():
        raise CheckpointError(
            f"no checkpoint in {directory}: drop --resume, or point --checkpoint-dir at a run's folder"
        )
    _refuse_foreign_files(directory, resume or overwrite, log_file)  # before the lock adds a file of ours
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / ".lock", "a+")
    except OSError as e:
        raise CheckpointError(
            f"cannot use --checkpoint-dir {directory} ({e.strerror}): choose a writable folder"
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "another process"
        lock.close()
        raise CheckpointError(
            f"--checkpoint-dir {directory} is in use by another train.py ({owner}): give each run its own folder"
        ) from None
    try:
        for stale in TEMPORARY:  # a save that was killed halfway; the lock says it is over
            (directory / stale).unlink(missing_ok=True)
        exists = (directory / FILES[0]).exists()
        if exists and not resume and not overwrite:
            raise CheckpointError(
                f"--checkpoint-dir {directory} holds a checkpoint: continue it with --resume, start over with "
                "--overwrite, or use a new --checkpoint-dir"
            )
        saved = resume and _saved_run_state(directory / FILES[0])
        if saved and (not (directory / FILES[1]).exists() or (directory / FILES[1]).read_text() != saved + "\n"):
            _atomic_write(directory / FILES[1], lambda tmp: tmp.write_text(saved + "\n"))  # killed between the two
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
    except (CheckpointError, OSError) as e:
        with contextlib.suppress(OSError):  # refused: the folder stays free (a full disk fails the close too)
            lock.close()
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot use --checkpoint-dir {directory} ({e.strerror}): {_fix(e)}") from None
        raise
    return lock


def _refuse_foreign_files(directory: Path, allowed: bool, log_file):
    """CheckpointError when `directory` holds anything but this program's files and the run's own log,
    unless `allowed` (a resume, which writes only its own files, or --overwrite, which replaces only those)."""
    if allowed or not directory.is_dir():
        return
    log = Path(log_file).resolve() if log_file else None
    own = {*FILES, ".lock", *TEMPORARY, *([log.name] if log and log.parent == directory.resolve() else [])}
    foreign = sorted(entry.name for entry in directory.iterdir() if entry.name not in own)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise CheckpointError(
            f"--checkpoint-dir {directory} holds files this program did not write ({shown}): use a new or empty "
            "folder, or --overwrite (which replaces only this program's own files)"
        )


def _fix(error: OSError) -> str:
    return "free disk space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a writable folder"


def retire(directory):
    """Remove the checkpoint in `directory` (its folder claimed): a run started over with --overwrite
    does this before it trains, so no later --resume can continue the old run into the new log."""
    try:
        for name in FILES:
            (Path(directory) / name).unlink(missing_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot remove the old checkpoint in {directory} ({e.strerror})") from None


def _saved_run_state(path: Path):
    """The run state's JSON text in a safetensors file's header, read without its arrays, if its
    checksum proves it whole (else None)."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= min(path.stat().st_size, LARGEST_HEADER):
                return None
            metadata = json.loads(f.read(length))["__metadata__"]
        text = metadata["run_state"]
        return text if metadata["run_state_crc32"] == str(zlib.crc32(text.encode())) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


TEMPORARY = [_temporary(Path(name)).name for name in FILES]


def _atomic_write(path: Path, write):
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def all_finite(arrays) -> bool:
    return all(mx.isfinite(v).all().item() for v in arrays if mx.issubdtype(v.dtype, mx.floating))


def checksum(array) -> int:
    """CRC-32 of an array's bytes, whatever its dtype."""
    return zlib.crc32(memoryview(np.array(array.reshape(-1).view(mx.uint8))))


def save(directory, model, optimizer, run_state: dict, group=None):
    """Write the checkpoint of `model`, `optimizer`, the MLX RNG and `run_state` (JSON-able: a
    RunState's to_json(), the run's config and what it trains on), with a checksum of every array.

    Under mlx.launch every process of `group` must call it: it gathers their RNG keys. Raises
    CheckpointError, leaving the previous checkpoint as it was, when a parameter is not finite or
    the files cannot be written (a full disk, say).
    """
    keys = mx.random.state[0][None]
    if group is not None and group.size() > 1:
        keys = mx.distributed.all_gather(keys, group=group)
        if group.rank() > 0:
            mx.eval(keys)
            return
    directory = Path(directory)
    arrays = {f"model.{k}": v for k, v in tree_flatten(model.parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    if not all_finite(arrays.values()):
        raise CheckpointError(f"not saved: the parameters at step {run_state['step']} are not all finite")
    arrays["rng.keys"] = keys
    text = json.dumps({**run_state, "format": FORMAT}, indent=1, sort_keys=True)
    metadata = {"run_state": text, "checksums": json.dumps({k: checksum(v) for k, v in arrays.items()})}
    metadata["run_state_crc32"] = str(zlib.crc32(text.encode()))
    try:
        _atomic_write(directory / FILES[0], lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata=metadata))
        _atomic_write(directory / FILES[1], lambda tmp: tmp.write_text(text + "\n"))
    except (OSError, RuntimeError) as e:  # MLX reports a failed write as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) else str(e).splitlines()[0]
        if not directory.is_dir():
            kept = "the folder was removed while the run was going, and no checkpoint is left"
        elif (directory / FILES[0]).exists():
            kept = "the previous one is intact"
        else:
            kept = "it holds no earlier checkpoint"
        raise CheckpointError(f"cannot write a checkpoint in {directory} ({reason}); {kept}") from None


def read(path: Path):
    """(arrays, run state) of a checkpoint file, every array checked against its checksum;
    CheckpointError naming the file for anything that is not a whole checkpoint of this program."""
    not_ours = f"{path} is not a checkpoint of this program, or is damaged"
    try:
        check_layout(path)
        arrays, metadata = mx.load(str(path), return_metadata=True)
        run_state = json.loads(metadata["run_state"])
        checksums = json.loads(metadata.get("checksums", "{}"))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{not_ours} ({reason}): use another --checkpoint-dir") from None
    if not isinstance(run_state, dict) or not isinstance(checksums, dict):
        raise CheckpointError(f"{not_ours}: its metadata is not a run state; use another --checkpoint-dir")
    if run_state.get("format", 1) not in READABLE:
        raise CheckpointError(
            f"{path} is in checkpoint format {run_state.get('format', 1)}, from another version of "
            f"mlx-adagrad (this one reads format {FORMAT}): resume with that version or use a new --checkpoint-dir"
        )
    wrong = [k for k, kind in RUN_STATE.items() if not isinstance(run_state.get(k), kind)]
    if wrong or "rng.keys" not in arrays:
        raise CheckpointError(f"{not_ours}: its run state lacks {', '.join(wrong or ['rng.keys'])}")
    if run_state["format"] >= 4 and metadata.get("run_state_crc32") != str(zlib.crc32(metadata["run_state"].encode())):
        raise CheckpointError(f"{path} is damaged: its run state fails its checksum; use another --checkpoint-dir")
    if run_state["format"] == 2 and not all_finite(arrays.values()):
        raise CheckpointError(f"{path} is damaged: it holds values that are not finite; use another --checkpoint-dir")
    if run_state["format"] >= 3:
        if set(checksums) != set(arrays):
            raise CheckpointError(f"{not_ours}: it holds {len(arrays)} arrays, its checksums name {len(checksums)}")
        damaged = [k for k, v in arrays.items() if checksum(v) != checksums[k]]
        if damaged:
            raise CheckpointError(f"{path} is damaged: {len(damaged)} array(s) fail their checksum, first {damaged[0]}")
    return arrays, run_state


def check_layout(path: Path):
    """ValueError unless the safetensors header of `path` describes arrays that lie inside the file, each
    as long as its dtype and shape say: read before MLX allocates anything the header claims."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or not 0 < length <= min(size - 8, LARGEST_HEADER):
            raise ValueError(f"its header claims {length} bytes of a {size}-byte file")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a table of arrays")
    data = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            shape, item = entry["shape"], ITEM_SIZE[entry["dtype"]]
            fits = all(type(d) is int and d >= 0 for d in [*shape, begin, end]) and 0 <= begin <= end <= data
        except (KeyError, TypeError, ValueError):
            fits = False
        if not fits or end - begin != math.prod(shape) * item:
            raise ValueError(f"its header places array {name[:80]} outside the file or at the wrong size")


def load(directory, model, optimizer, identity: dict, content: dict, rank: int = 0) -> RunState:
    """Restore model, optimizer and process `rank`'s RNG from `directory`; return the saved RunState.

    `identity` holds the settings that change what the saved arrays mean and `content` digests of
    what the run trains on: a checkpoint that differs in any of them is refused. The model and the
    optimizer (initialised) give the arrays it must hold, each of its shape and dtype.

    Call it before building the compiled step: the step captures these state objects.
    """
    path = Path(directory) / FILES[0]
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: drop --resume, or point --checkpoint-dir at a run's folder")
    arrays, run_state = read(path)
    saved = run_state["config"]
    differ = [k for k in identity if saved.get(k) != identity[k]]
    if differ:
        changes = ", ".join(f"{k}={saved.get(k)!r} (now {identity[k]!r})" for k in differ)
        raise CheckpointError(
            f"{path} is from another run configuration: {changes}; "
            f"resume with the same settings or use a new --checkpoint-dir"
        )
    saved_content = run_state.get("content", content)
    if saved_content != content:
        changed = ", ".join(k for k in content if saved_content.get(k) != content[k])
        raise CheckpointError(
            f"{path} was trained on other data ({changed} differ from the checkpoint's): resume with the same "
            "files or use a new --checkpoint-dir"
        )
    expected = {f"model.{k}": v for k, v in tree_flatten(model.parameters())}
    expected.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    for name, want in expected.items():
        got = arrays.get(name)
        if got is None or got.shape != want.shape or got.dtype != want.dtype:
            found = "missing" if got is None else f"{_name(got.dtype)} {got.shape}"
            raise CheckpointError(
                f"{path} does not fit this model: {name} is {found}, this run has {_name(want.dtype)} {want.shape}; "
                "use a new --checkpoint-dir"
            )
    if arrays["rng.keys"].shape[0] <= rank:
        raise CheckpointError(f"{path} holds RNG keys for {arrays['rng.keys'].shape[0]} process(es), not rank {rank}")
    model.update(tree_unflatten([(k[len("model.") :], v) for k, v in arrays.items() if k.startswith("model.")]))
    optimizer.state = tree_unflatten(
        [(k[len("optimizer.") :], v) for k, v in arrays.items() if k.startswith("optimizer.")]
    )
    optimizer.init(model.trainable_parameters())
    high, low = arrays["rng.keys"][rank].tolist()  # mx.random.key(seed) is [seed >> 32, seed & 0xffffffff]
    mx.random.seed((high << 32) | low)
    return RunState.from_json(run_state)


def _name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def last_good(checkpoint_dir):
    """'; the last good checkpoint (step N) is in DIR' when DIR holds one that passes its checks, else ''."""
    path = checkpoint_dir and Path(checkpoint_dir) / FILES[0]
    if not path or not path.exists():
        return ""
    try:
        _, run_state = read(path)
    except CheckpointError:
        return ""
    return f"; the last good checkpoint (step {run_state['step']}) is in {checkpoint_dir}"
