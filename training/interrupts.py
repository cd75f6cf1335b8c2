"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM, whenever they come."""

import contextlib
import os
import signal

import mlx.core as mx

SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Stopped(Exception):
    """A stop signal ended the run: the message says where and what was saved; `code` is the exit status."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class Interrupts:
    """SIGINT and SIGTERM from main() on. Outside training (loading data, training a tokenizer,
    sampling) a signal raises Stopped at once; while training (`deferred`) it asks the loop to stop
    after its step, which saves first. A second signal exits at once.

    Under mlx.launch the processes agree on the step: a stop requested on any of them stops them all."""

    def __init__(self):
        self.signal, self.world, self.deferring = None, 1, False
        self.outside = "before training began; nothing to resume"
        self.previous = {s: signal.signal(s, self.handle) for s in SIGNALS}
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # blocked across a restart (training/cpu_tuning.py)

    def handle(self, signum, frame):
        if self.signal is not None:
            os._exit(128 + signum)
        self.signal = signum
        if not self.deferring:
            raise Stopped(f"stopped by {self.name} {self.outside}", 128 + signum)

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
            asked = mx.distributed.all_sum(mx.array(self.signal or 0)).item()
            if asked and self.signal is None:
                self.signal = signal.SIGTERM
        return self.signal is not None

    @property
    def name(self):
        return signal.Signals(self.signal).name

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
