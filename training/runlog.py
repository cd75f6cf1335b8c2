"""The run's JSONL log: a header line, then one JSON object a line, each written whole or not at all."""

import json
from pathlib import Path


class LogError(Exception):
    """A log that cannot be used or written; the message says why and what to do."""


class JsonlLog:
    """One JSON object per line; a no-op without a path.

    Opening checks that the file can be written and that a fresh run does not overwrite another
    run's log; nothing in the file changes until start() (a fresh run) or resume(lines).
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

    def _cut(self, size: int):
        if self.path.is_file():
            self.file.truncate(size)

    def start(self, header: dict):
        """Begin a fresh log with `header`."""
        if self.file:
            self._cut(0)
            self.write(header)

    def resume(self, lines: int):
        """Continue after the first `lines` lines (what the checkpoint had logged): later ones are
        dropped, since the resumed run writes them again."""
        if not self.file or not self.path.is_file():
            return
        kept = self.path.read_bytes().splitlines(keepends=True)[:lines]
        self._cut(sum(len(line) for line in kept))
        self.lines = len(kept)

    def write(self, record: dict):
        if not self.file:
            return
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

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.close()

    def close(self):
        if self.file:
            self.file.close()
