"""Checkpoints: model, optimizer state, RNG key, data position and config in one safetensors file.

<dir>/checkpoint.safetensors holds arrays "model.*", "optimizer.*", "rng.keys" (one RNG key
per process) and the JSON run state in its metadata; <dir>/checkpoint.json repeats that JSON
for people. Both are written to a temporary file and renamed, so a crash never leaves half a
file. Data-parallel processes hold equal weights and optimizer state, so only rank 0 writes;
to resume on several machines, --checkpoint-dir must be a folder they all see.
"""

import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

# Version 2 stores dense layers' weights (in, out) (models/dense.py); version 1 had nn.Linear's (out, in),
# which a square layer would load silently transposed.
FORMAT = 2


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


def _atomic_write(path: Path, write):
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save(directory, model, optimizer, run_state: dict, group=None):
    """Write the checkpoint of `model`, `optimizer`, the MLX RNG and `run_state` (JSON-able).

    Under mlx.launch every process of `group` must call it: it gathers their RNG keys.
    """
    keys = mx.random.state[0][None]
    if group is not None and group.size() > 1:
        keys = mx.distributed.all_gather(keys, group=group)
        if group.rank() > 0:
            mx.eval(keys)
            return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {f"model.{k}": v for k, v in tree_flatten(model.parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    arrays["rng.keys"] = keys
    text = json.dumps({**run_state, "format": FORMAT}, indent=1, sort_keys=True)
    _atomic_write(
        directory / "checkpoint.safetensors",
        lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata={"run_state": text}),
    )
    _atomic_write(directory / "checkpoint.json", lambda tmp: tmp.write_text(text + "\n"))


def load(directory, model, optimizer, identity: dict, rank: int = 0) -> dict:
    """Restore model, optimizer and process `rank`'s RNG from `directory`; return the saved run state.

    `identity` holds the settings that change what the saved arrays mean: a checkpoint whose config
    differs in any of them is refused.

    Call it before building the compiled step: the step captures these state objects.
    """
    path = Path(directory) / "checkpoint.safetensors"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: drop --resume, or point --checkpoint-dir at a run's folder")
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
        run_state = json.loads(metadata["run_state"])
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({e}): delete it or use another --checkpoint-dir"
        ) from None
    if run_state.get("format", 1) != FORMAT:
        raise CheckpointError(
            f"{path} is in checkpoint format {run_state.get('format', 1)}, from another version of "
            f"mlx-adagrad (this one reads format {FORMAT}): resume with that version or use a new --checkpoint-dir"
        )
    saved = run_state["config"]
    differ = [k for k in identity if saved.get(k) != identity[k]]
    if differ:
        changes = ", ".join(f"{k}={saved.get(k)!r} (now {identity[k]!r})" for k in differ)
        raise CheckpointError(
            f"{path} is from another run configuration: {changes}; "
            f"resume with the same settings or use a new --checkpoint-dir"
        )

    params = {k[len("model.") :]: v for k, v in arrays.items() if k.startswith("model.")}
    current = dict(tree_flatten(model.parameters()))
    if {k: v.shape for k, v in params.items()} != {k: v.shape for k, v in current.items()}:
        raise CheckpointError(f"{path} holds weights of another model shape: use a new --checkpoint-dir")
    model.update(tree_unflatten(list(params.items())))
    optimizer.state = tree_unflatten(
        [(k[len("optimizer.") :], v) for k, v in arrays.items() if k.startswith("optimizer.")]
    )
    optimizer.init(model.trainable_parameters())
    high, low = arrays["rng.keys"][rank].tolist()  # mx.random.key(seed) is [seed >> 32, seed & 0xffffffff]
    mx.random.seed((high << 32) | low)
    return run_state
