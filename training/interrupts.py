"""Stopping a run cleanly on any signal that would end it, whenever it comes: the one stop path."""

import contextlib
import errno
import shlex
import signal

from training import failures

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
        """A standard stream failed (training/failures.py): a stop like a signal's, with a closed pipe's
        status (128 + SIGPIPE, as a shell reports it), or 2 for a stream that cannot be written."""
        closed = error.errno == errno.EPIPE
        self.ask(signal.SIGPIPE, f"because {failures.lost_stream_reason(name, error)}", 141 if closed else 2)

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
