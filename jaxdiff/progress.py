"""The one progress line of long loops that are not training (sampling, feature extraction, attacks, certification):
'<what> done/total (pct) | rate | ETA', at most every ``every_s`` seconds and always at the end."""
from __future__ import annotations

import datetime
import math
import time
from typing import Callable, Optional


def format_eta(seconds: float) -> str:
    """Seconds -> 'H:MM:SS' (or '?' when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return '?'
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
    """Counts finished items of ``total`` and logs 'sampled 1,024/50,000 (2.0%) | 812.3 img/s | ETA 0:01:00'.

    what: the line's first word(s), e.g. 'sampled' or 'PGD-10:'; unit: what the rate counts ('img').
    The rate counts from the end of the first update, whose time includes compilation; before two updates it is '?'.
    """

    def __init__(self, what: str, total: int, log: Callable[[str], None] = print, every_s: float = 10.0,
                 unit: str = 'img'):
        self.what, self.total, self.log, self.every_s, self.unit = what, total, log, every_s, unit
        self.done = 0
        self._t0: Optional[float] = None
        self._base = 0
        self._last = 0.0

    def add(self, count: int, force: bool = False) -> None:
        """Add ``count`` finished items; log when ``every_s`` passed since the last line, at the end, or forced."""
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._base, self._last = now, self.done + count, now
        self.done += count
        if force or self.done >= self.total or now - self._last >= self.every_s:
            self._last = now
            self.log(self.line(now))

    def rate(self, now: Optional[float] = None) -> float:
        """Items per second since the first update (nan before two updates)."""
        now = time.perf_counter() if now is None else now
        elapsed = now - (self._t0 if self._t0 is not None else now)
        return (self.done - self._base) / elapsed if elapsed > 0 else float('nan')

    def line(self, now: Optional[float] = None) -> str:
        """The progress line at time ``now`` (perf_counter seconds)."""
        rate = self.rate(now)
        pct = 100.0 * self.done / max(self.total, 1)
        head = f'{self.what} {self.done:,}/{self.total:,} ({pct:.1f}%)'
        if not math.isfinite(rate):  # one update so far: nothing to time yet
            return head if self.done >= self.total else f'{head} | ? {self.unit}/s | ETA ?'
        eta = (self.total - self.done) / rate if rate > 0 else float('nan')
        return f'{head} | {rate:.1f} {self.unit}/s | ETA {format_eta(eta)}'
