"""A line in the log every so often while a long loop runs where no progress bar is shown (stderr a file,
a CI log, a job scheduler's output): training steps within an epoch, certification's images."""
from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("duoclass")

EVERY_S = 60.0  # seconds between two lines


class Heartbeat:
    """`beat(done, extra)` logs "WHAT: done/total (p%), EXTRA, Ns" at most every `every` seconds; `extra` is
    called only when a line is written (a loss read from the device costs a sync, so not every step)."""

    def __init__(self, what: str, total: int, every: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.clock = what, total, clock
        self.every = EVERY_S if every is None else every
        self.start = self.last = clock()

    def beat(self, done: int, extra: Callable[[], str] | None = None) -> bool:
        now = self.clock()
        if now - self.last < self.every:
            return False
        self.last = now
        share = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        log.info("%s: %d/%d%s%s, %.0f s", self.what, done, self.total, share, f", {extra()}" if extra else "",
                 now - self.start)
        return True
