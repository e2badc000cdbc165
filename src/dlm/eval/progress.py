"""Progress of long evaluation and sampling work on stderr: units done, rate and ETA.

On a terminal one line is rewritten in place (at most every ``TTY_EVERY_S`` seconds, and once at the end);
elsewhere (logs, pipes, tests) a line is printed every ``LOG_EVERY_S`` seconds, so short work prints nothing
and a long job's log shows it is alive. A :class:`Progress` is the ``progress(done, total)`` callback that
:func:`dlm.eval.likelihood.evaluate_nll` and the samplers' callers accept.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

TTY_EVERY_S = 0.2
LOG_EVERY_S = 10.0


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """``progress(done, total)``: prints ``"{what}: done/total {unit}, rate/s, ETA m:ss"`` to ``stream``."""

    def __init__(self, what: str, unit: str, stream: TextIO | None = None) -> None:
        self.what, self.unit = what, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.printed = False

    def line(self, done: int, total: int | None) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        of = f"/{total}" if total else ""
        eta = f", ETA {_duration((total - done) / rate)}" if total and rate > 0 and done < total else ""
        return f"{self.what}: {done}{of} {self.unit}, {rate:.2f} {self.unit}/s, {_duration(elapsed)} elapsed{eta}"

    def __call__(self, done: int, total: int | None = None) -> None:
        now = time.perf_counter()
        final = total is not None and done >= total
        every = TTY_EVERY_S if self.tty else LOG_EVERY_S
        if not final and now - self.last < every:
            return
        if final and not self.tty and not self.printed and now - self.t0 < LOG_EVERY_S:
            return  # short work in a log: nothing to say
        self.last = now
        self.printed = True
        text = self.line(done, total)
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
