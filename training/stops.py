"""How a run ends early, each way in one place and each in one line that names what happened and the fix.

Stop signals: Interrupts, the one stop path (a signal while training stops after its step, which
saves; elsewhere at once), and resume_command, the command that continues. Failures from outside the
program: the standard streams (closed at start, or failing while the run prints: a stop like a
signal's), MLX's kernel cache, memory, the disk, and errors MLX raises. main() installs Interrupts,
calls guard_streams() first and explain() for what it catches."""

import contextlib
import errno
import os
import shlex
import signal
import sys
from pathlib import Path

# Every signal whose default action ends the process and that a program may catch: a closed terminal
# or SSH session (SIGHUP), Ctrl-C (SIGINT), Ctrl-\ (SIGQUIT), kill (SIGTERM), the user and timer
# signals, a CPU-time limit. Not the ones that report a fault in the process itself (SIGSEGV, SIGBUS,
# SIGFPE, SIGILL, SIGABRT), nor SIGPIPE and SIGXFSZ, which Python ignores (they come back as OSErrors).
NAMES = ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF",
         "SIGXCPU", "SIGPWR", "SIGIO", "SIGSTKFLT")  # fmt: skip
SIGNALS = {getattr(signal, name) for name in NAMES if hasattr(signal, name)}


class Stopped(Exception):
    """A stop signal ended the run: the message says where and what was saved; `code` is the exit status."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def resume_command(typed: list) -> str:
    """The command line `typed` (the interpreter first) as a shell takes it back, continuing the run:
    --resume in place of --overwrite (or an abbreviation argparse took for it)."""

    def names(word, option):
        return word.startswith("--") and len(word) > 2 and option.startswith(word.split("=")[0])

    kept = [word for word in typed if not names(word, "--overwrite")]
    return shlex.join(kept if any(names(word, "--resume") for word in kept[1:]) else [*kept, "--resume"])


class Interrupts:
    """Every signal of SIGNALS (but those the process was started ignoring, as nohup leaves SIGHUP)
    from main() on. Outside training (loading data, training a tokenizer, sampling) a signal raises
    Stopped at once; while training (`deferred`) it asks the loop to stop after its step, which saves
    first. Further signals while a stop is under way change nothing: the stop saves and ends the run.

    Under mlx.launch the processes agree on the step: a stop requested on any of them stops them all."""

    def __init__(self):
        self.signal, self.cause, self.code, self.world, self.deferring = None, "", 0, 1, False
        self.outside = "before training began; nothing to resume"
        caught = {s for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
        self.previous = {s: signal.signal(s, self.handle) for s in caught}
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # blocked across a restart (training/cpu_tuning.py)

    def handle(self, signum, frame):
        self.ask(signum, f"by {signal.Signals(signum).name}", 128 + signum)

    def lost_output(self, name, error):
        """A standard stream failed (guard_streams below): a stop like a signal's, with a closed pipe's
        status (128 + SIGPIPE, as a shell reports it), or 2 for a stream that cannot be written."""
        closed = error.errno == errno.EPIPE
        self.ask(signal.SIGPIPE, f"because {lost_stream_reason(name, error)}", 141 if closed else 2)

    def ask(self, signum, cause, code):
        if self.signal is not None:
            return
        self.signal, self.cause, self.code = signum, cause, code
        if not self.deferring:
            raise self.stop_here()

    def stop_here(self, where=None) -> Stopped:
        """The Stopped for a stop that saves nothing (outside training, or a step the signal broke)."""
        return Stopped(f"stopped {self.cause} {where or self.outside}", self.code)

    @contextlib.contextmanager
    def deferred(self, world):
        """While training: a signal waits for stopped(), which the loop asks after each step."""
        self.world, self.deferring = world, True
        try:
            yield self
        finally:
            self.deferring, self.outside = False, "after training ended"

    def stopped(self) -> bool:
        if self.world > 1:  # another process was asked to stop: this one stops at the same step
            import mlx.core as mx

            asked = mx.distributed.all_sum(mx.array(self.signal or 0)).item()
            if asked and self.signal is None:
                self.signal, self.cause, self.code = signal.SIGTERM, "by another process's stop", 128 + signal.SIGTERM
        return self.signal is not None

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        for s, handler in self.previous.items():  # after a stop the process ends: later signals change nothing
            signal.signal(s, handler if self.signal is None else signal.SIG_IGN)


# Failures from outside the program: the standard streams, MLX's kernel cache, memory, the disk.


class OutsideError(Exception):
    """Something outside the program failed; the message names it and the fix."""


class GuardedStream:
    """sys.stdout or sys.stderr: a write that fails (the reader left, a full disk, a hung-up terminal)
    points the stream's file descriptor at /dev/null, so that nothing later fails on it, and calls
    `lost(name, error)` once."""

    def __init__(self, stream, name: str, lost):
        self.stream, self.name, self.lost, self.failed = stream, name, lost, False

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as e:
            self._fail(e)
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except OSError as e:
            self._fail(e)

    def _fail(self, error):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self.stream.fileno())  # what is still buffered now goes to /dev/null, and Python's exit too
        os.close(null)
        if not self.failed:
            self.failed = True
            self.lost(self.name, error)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def guard_streams(lost):
    """Give closed standard streams /dev/null (a run started with >&- or 2>&-, as cron may start it,
    still trains and writes its log, and no file it opens takes descriptor 1 or 2), and route
    failures of stdout and stderr to `lost(name, error)`."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)  # inheritable, as a standard stream is: children get it too
                os.close(null)
            os.set_inheritable(fd, True)
        if getattr(sys, name) is None:  # closed when Python started: whatever holds its number now is a library's
            os.set_inheritable(fd, False)  # so a program started from here gets it closed, not as its stream
            setattr(sys, name, open(os.devnull, "r" if fd == 0 else "w"))
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), GuardedStream):
            setattr(sys, name, GuardedStream(getattr(sys, name), name, lost))


def lost_stream_reason(name: str, error: OSError) -> str:
    if error.errno == errno.EPIPE:
        return f"its standard {name[3:]}put was closed"
    return (
        f"its standard {name[3:]}put cannot be written ({error.strerror}): send it to a file that can be, or to "
        "/dev/null"
    )


def kernel_folder() -> Path:
    """Where mx.compile keeps the CPU kernels it builds: $TMPDIR/mlx/<MLX version>/cpu (as MLX's
    std::filesystem::temp_directory_path() finds it)."""
    import mlx.core as mx

    return Path(os.environ.get("TMPDIR") or "/tmp") / "mlx" / mx.__version__ / "cpu"


def remove_damaged_kernels(folder: Path | None = None) -> int:
    """Remove every kernel in MLX's cache that is not a whole shared library (empty, cut short by a
    full disk or a killed build), before MLX loads one: MLX builds it again. Returns how many."""
    folder = folder or kernel_folder()
    removed = 0
    for library in folder.glob("*.so") if folder.is_dir() else ():
        if not whole_elf(library):
            library.unlink(missing_ok=True)
            removed += 1
    return removed


def whole_elf(path: Path) -> bool:
    """Whether `path` is an ELF file at least as long as its header says (its section headers, which
    the linker writes last, lie inside it)."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit ELF, as on x86-64 and aarch64
        return False
    order = "little" if header[5] == 1 else "big"
    section_table = int.from_bytes(header[0x28:0x30], order)
    entry, count = int.from_bytes(header[0x3A:0x3C], order), int.from_bytes(header[0x3C:0x3E], order)
    program_table = int.from_bytes(header[0x20:0x28], order)
    program_entry, program_count = int.from_bytes(header[0x36:0x38], order), int.from_bytes(header[0x38:0x3A], order)
    return size >= max(section_table + entry * count, program_table + program_entry * program_count)


def explain(error: BaseException) -> str | None:
    """One line for a failure from outside (memory, the disk, MLX's compiler and kernel cache), or
    None for an exception that is a bug of this program's own."""
    if isinstance(error, MemoryError):
        return "out of memory: close other programs, or use a smaller --batch-size (or --dim, --context)"
    if isinstance(error, OSError):
        where = f" {error.filename}" if error.filename else ""
        fix = "free disk space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "check the path and its permissions"
        return f"cannot use{where} ({error.strerror or error}): {fix}"
    if not isinstance(error, RuntimeError):
        return None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    if "Compile" in first or "shared library" in first or "compile" in first:
        folder = kernel_folder()
        return (
            f"mx.compile could not build or load a CPU kernel in {folder} ({first}): check that g++ works and "
            f"that the disk has room; if it persists, remove {folder} (MLX rebuilds it), or run with --no-compile"
        )
    if "alloc" in first.lower() or "memory" in first.lower():
        return f"out of memory ({first}): use a smaller --batch-size (or --dim, --context)"
    return f"MLX failed: {first}"
