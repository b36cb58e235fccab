"""What a start-up is doing, on stderr, for a person at a terminal: `loading the model... 0.3 s`, and a bar for the
loops that take longer than a second (dequantizing layers, uploading weights, loading kernels).

Silent when stderr is not a terminal (logs, pipes, tests read clean output) or when the user asked for --quiet;
QTRT_PROGRESS=1 forces it on. Stages are transient: each line is erased when it ends, so the terminal holds only
the answer.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time


class Progress:
    def __init__(self, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = os.environ.get("QTRT_PROGRESS") == "1" or (hasattr(self.stream, "isatty") and self.stream.isatty())
        self.enabled = bool(enabled) and os.environ.get("QTRT_PROGRESS") != "0"
        self.times: dict[str, float] = {}  # seconds per stage and bar, shown or not (`generate --json` reports them)

    def _line(self, text: str):
        self.stream.write("\r\033[K" + text)
        self.stream.flush()

    @contextlib.contextmanager
    def stage(self, text: str):
        """A step without a count: its name while it runs; erased when done."""
        t0 = time.perf_counter()
        if self.enabled:
            self._line(f"qtrt: {text}...")
        try:
            yield
        finally:
            self.times[text] = round(time.perf_counter() - t0, 4)
            if self.enabled:
                self._line(f"qtrt: {text}... {self.times[text]:.1f} s")
                self._line("")

    def bar(self, iterable, total: int | None = None, text: str = "", unit: str = "it", scale: bool = False):
        """Iterate with a progress bar (tqdm, erased at the end)."""
        from tqdm import tqdm

        t0 = time.perf_counter()
        yield from tqdm(iterable, total=total, desc=f"qtrt: {text}", unit=unit, unit_scale=scale, leave=False,
                        disable=not self.enabled, file=self.stream, mininterval=0.2, dynamic_ncols=True)
        self.times[text] = round(time.perf_counter() - t0, 4)


def quiet() -> Progress:
    """A silent Progress (still timing its stages)."""
    return Progress(enabled=False)
