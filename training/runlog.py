"""What a run writes: its JSONL log (a header line, then one JSON object a line, each written whole or not
at all), and the lines it prints (`say`)."""

import fcntl
import json
import os
from pathlib import Path

import mlx.core as mx


def say(*text):
    """print, on the first process only: under mlx.launch the others stay quiet."""
    if mx.distributed.init().rank() == 0:
        print(*text)


class LogError(Exception):
    """A log that cannot be used or written; the message says why and what to do."""


class JsonlLog:
    """One JSON object per line; a no-op without a path.

    Opening checks that the file can be written and that a fresh run does not overwrite another
    run's log, and claims the file (an OS lock, released when the process ends however it ends) so
    that no two runs ever write one log; nothing in the file changes until start() (a fresh run) or
    resume() (only the log of the run resumed, named by its run id).
    """

    def __init__(self, path, fresh: bool, overwrite: bool = False):
        self.path, self.file, self.lines = Path(path) if path else None, None, 0
        if self.path is None:
            return
        if fresh and self.path.is_file() and self.path.stat().st_size and not overwrite:
            raise LogError(
                f"--log-file {self.path} exists: continue its run with --resume, start over with --overwrite, "
                "or choose another --log-file"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "ab", buffering=0)  # unbuffered: a record is one write
        except OSError as e:
            raise LogError(f"cannot write --log-file {self.path} ({e.strerror}): choose a writable path") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise LogError(f"--log-file {self.path} is in use by another train.py: give each run its own log") from None
        except OSError:
            pass  # a file that cannot be locked (a device such as /dev/full): written without the claim

    def _cut(self, size: int):
        if self.path.is_file():
            self.file.truncate(size)

    def start(self, header: dict):
        """Begin a fresh log with `header`."""
        if self.file:
            self._cut(0)
            self.write(header)

    def resume(self, lines: int, header: dict):
        """Continue the log of the run `header` names (its run_id) after its first `lines` lines (what
        the checkpoint had logged): later ones are dropped, since the resumed run writes them again.
        An empty or new file starts with `header`; the log of another run is refused, untouched."""
        if not self.file:
            return
        text = self.path.read_bytes() if self.path.is_file() else b""
        if not text:
            return self.write(header)
        try:
            logged = json.loads(text.split(b"\n", 1)[0]).get("run_id", "")
        except (ValueError, AttributeError):
            logged = None
        if logged != header.get("run_id", ""):
            raise LogError(
                f"--log-file {self.path} is not the log of the run in --checkpoint-dir (run "
                f"{header.get('run_id') or 'unnamed'}): pass that run's log, or a new --log-file"
            )
        kept = text.splitlines(keepends=True)[:lines]
        self._cut(sum(len(line) for line in kept))
        self.lines = len(kept)

    def write(self, record: dict):
        if not self.file:
            return
        self._check_still_there()
        data = (json.dumps(record) + "\n").encode()
        end = self.path.stat().st_size if self.path.is_file() else 0
        try:
            written = self.file.write(data)
            if written != len(data):
                raise OSError(28, "No space left on device")
        except OSError as e:
            self._cut(end)  # no half line: the log ends with the last whole record
            raise LogError(
                f"cannot write --log-file {self.path} ({e.strerror}); it ends with its last whole line"
            ) from None
        self.lines += 1

    def _check_still_there(self):
        """LogError when the file at the path is no longer the one this log writes (removed, or replaced)."""
        try:
            now = os.stat(self.path)
        except OSError:
            now = None
        mine = os.fstat(self.file.fileno())
        if now is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            raise LogError(
                f"--log-file {self.path} was {'removed' if now is None else 'replaced'} while the run was going, so "
                "its records since are lost"
            )

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.close()

    def close(self):
        if self.file:
            self.file.close()
