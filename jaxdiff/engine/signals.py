"""Clean stops: SIGTERM / SIGINT recorded, not fatal, so a training loop finishes its step, saves and exits."""
from __future__ import annotations

import signal
from typing import Optional

import jax
import numpy as np


class StopSignal:
    """Records SIGTERM / SIGINT instead of dying, so the loop can finish the step, save and exit cleanly.

    A second SIGINT while stopping raises KeyboardInterrupt (the user really wants out).
    """

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def requested(self) -> bool:
        """Whether any process received a stop signal (all processes agree: one tiny all-gather per step)."""
        flag = self.received is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            flag = bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).max())
        return flag
