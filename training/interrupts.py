"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM ask the training loop to stop after its step."""

import os
import signal

import mlx.core as mx


class Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current step; a second one exits at once.

    Under mlx.launch the processes agree on the step: a stop requested on any of them stops them all."""

    def __init__(self, world):
        self.world, self.signal = world, None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signal is not None:
            os._exit(128 + signum)
        self.signal = signum

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
        self.restore()

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
