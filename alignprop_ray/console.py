"""The console of `train`, `sweep` and `demo`: what Ray and Tune print, less the lines a user can do nothing
about. `--verbose` shows everything.

Every hidden line is in HIDDEN_LINES, with the reason. Failures are never hidden: a pattern names one
message, not a kind of message, and none of them is an error of the user's run (a worker-group start that
times out, for one, is a real trial failure and shows).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import threading
from collections.abc import Iterator

# A line that contains one of these (regular expressions) is hidden unless --verbose.
HIDDEN_LINES = (
    # Tune's TensorBoard hint: runs are in MLflow (a sweep prints its links at the end)
    r"To visualize your results with TensorBoard",
    # Tune's "Logical resource usage: 0/2 CPUs, 0/0 GPUs" counts only each trial's own request
    # (sweep/launch.py: DRIVER_RESOURCES), not the Ray Train workers that hold the CPUs and GPUs
    r"^\s*Logical resource usage:",
    # The raylet, when it starts more Python workers than the node has CPUs ("8 PYTHON worker processes
    # ... 4x the maximum expected startup concurrency (2)"): Ray Train starts a controller and its
    # helper actors (cleaner, state, synchronization, preemption watcher) for every run, none holding a CPU
    r"worker processes have been started on node: .* the maximum expected startup concurrency",
    # Ray Train's own helper actors (PreemptionWatcher) are created with their arguments in the object
    # store and max_restarts > 0; the warning is about Ray's code, not the user's
    r"Actor with class name: '\w+' and ID: '\w+' has constructor arguments in the object store",
    # Ray Train's placement-group cleaner when the state API did not answer one of its checks (at Ctrl-C the
    # dashboard stops first); it checks again a second later
    r"Failed to query Ray Train Controller actor state\. State API may be temporarily unavailable\. "
    r"Continuing to monitor\.",
    # Ray's hint on how to turn off the de-duplication of repeated log lines ("[repeated 2x across
    # cluster]" stays on the lines themselves)
    r"Ray deduplicates logs by default",
)


@contextlib.contextmanager
def quiet_console(verbose: bool, hidden: tuple[str, ...] = HIDDEN_LINES) -> Iterator[None]:
    """stdout and stderr during the block: all of them with `verbose`, else without the `hidden` lines.

    Ray prints its workers' and raylet's lines to whatever sys.stdout and sys.stderr are when a line
    arrives, so replacing them for the block filters those too.
    """
    if verbose:
        yield
        return
    out, err = LineFilter(sys.stdout, hidden), LineFilter(sys.stderr, hidden)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        out.close()
        err.close()


class LineFilter(io.TextIOBase):
    """A text stream that passes what is written on to `stream`, less the lines that match one of `hidden`
    (regular expressions, searched anywhere in the line). A line is held until it ends (or until the
    stream is closed)."""

    def __init__(self, stream, hidden: tuple[str, ...]):
        self.stream = stream
        self._hidden = re.compile("|".join(f"(?:{pattern})" for pattern in hidden))
        self._pending = ""
        self._lock = threading.Lock()  # Ray prints worker logs from a thread of its own

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._pending = (self._pending + text).split("\n")
            kept = "".join(f"{line}\n" for line in lines if not self._hides(line))
            if kept:
                self.stream.write(kept)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        """Write out a last unfinished line. The stream stays usable: a logging handler created inside the
        block keeps writing to it after the block (through the filter, to `stream`)."""
        with self._lock:
            if self._pending and not self._hides(self._pending):
                self.stream.write(self._pending)
            self._pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")

    def _hides(self, line: str) -> bool:
        return self._hidden.search(line) is not None
