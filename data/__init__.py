"""Data sets for the recipes. Every loader raises DataError with a one-line message."""

import os
from pathlib import Path


class DataError(Exception):
    """A data problem the user can fix; its message names the file and the fix."""


def default_data_dir() -> Path:
    """--data-dir default: $MLX_ADAGRAD_DATA, else ~/.cache/mlx-adagrad."""
    return Path(os.environ.get("MLX_ADAGRAD_DATA") or Path.home() / ".cache" / "mlx-adagrad")
