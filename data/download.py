"""Fetch a data set's files once, verified by sha256, written atomically."""

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from data import DataError

TIMEOUT_S = 5


class MissingFile(DataError):
    """A file that is not there and could not be downloaded."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_file(path: Path, urls: list, expected_sha256: str, verify: bool = True) -> Path:
    """Return `path`, downloading it first from the first url that answers if it is absent.

    The download goes to a temporary file in the same folder, is checked against
    `expected_sha256`, and only then renamed to `path`: an interrupted or corrupt
    download never leaves a file behind. A file already there is checked too (verify=False:
    trusted, for files of your own under the same names).
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder, expected the file {path.name}: remove or rename the folder")
    if path.exists():
        got = sha256(path) if verify else expected_sha256
        if got != expected_sha256:
            raise DataError(
                f"{path} is not the original file (sha256 {got[:12]}..., expected {expected_sha256[:12]}...): "
                "replace it, or delete it to download it again (--verify-data off trains on it as it is)"
            )
        return path
    hint = f"put {path.name} (sha256 {expected_sha256[:12]}...) in {path.parent}, or pass --data-dir"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as e:
        raise MissingFile(f"{path} is missing and {path.parent} is not writable ({e.strerror}): {hint}") from None
    errors = []
    try:
        with os.fdopen(fd, "wb") as out:
            for url in urls:
                try:
                    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                        total = int(response.headers.get("Content-Length") or 0) or None
                        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {path.name}") as bar:
                            for block in iter(lambda: response.read(1 << 16), b""):
                                out.write(block)
                                bar.update(len(block))
                    break
                except (urllib.error.URLError, OSError) as e:
                    errors.append(f"{url}: {getattr(e, 'reason', e)}")
                    out.seek(0)
                    out.truncate()
            else:
                raise MissingFile(f"{path} is missing and could not be downloaded (no network?): {hint}")
        got = sha256(Path(tmp))
        if got != expected_sha256:
            raise DataError(
                f"downloaded {path.name} has sha256 {got[:12]}..., expected {expected_sha256[:12]}...: "
                f"the mirror served a different file; {hint}"
            )
        os.replace(tmp, path)
        return path
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def ensure_files(folder: Path, files: dict, mirrors: list, verify: bool = True) -> dict:
    """{name: path} for `files` ({name: sha256}) in `folder`, each as ensure_file gives it from
    `mirrors` (url prefixes); the files that are neither there nor downloadable are named in one
    DataError, each with its sha256."""
    folder, paths, missing = Path(folder), {}, {}
    for name, digest in files.items():
        try:
            paths[name] = ensure_file(folder / name, [mirror + name for mirror in mirrors], digest, verify)
        except MissingFile:
            missing[name] = digest
    if missing:
        names = ", ".join(f"{name} (sha256 {digest})" for name, digest in missing.items())
        raise DataError(
            f"{folder} lacks {len(missing)} file(s) that could not be downloaded (no network?): put {names} "
            f"in {folder}, or pass --data-dir"
        )
    return paths
