"""What a sweep prints: Tune's console without its misleading lines, the outcome, and the MLflow UI links."""

from __future__ import annotations

import contextlib
import io
import sys
import threading

from alignprop_ray.sweep.summary import SweepOutcome

# Lines of Tune's console that mislead here, hidden unless --verbose: its TensorBoard hint (runs are in
# MLflow: the links after the sweep), and "Logical resource usage: 0/2 CPUs, 0/0 GPUs", which counts only
# each trial's own request (DRIVER_RESOURCES), not the Ray Train workers that hold the CPUs and GPUs.
HIDDEN_TUNE_LINES = ("To visualize your results with TensorBoard", "Logical resource usage:")


@contextlib.contextmanager
def tune_console(verbose: bool):
    """Tune's console during the block: all of it with `verbose`, else without HIDDEN_TUNE_LINES."""
    if verbose:
        yield
        return
    quiet = LineFilter(sys.stdout, HIDDEN_TUNE_LINES)
    try:
        with contextlib.redirect_stdout(quiet):
            yield
    finally:
        quiet.close()


class LineFilter(io.TextIOBase):
    """A text stream that passes what is written on to `stream`, less the lines that start with one of
    `hidden`. A line is held until it ends (or until `flush`, if it cannot become a hidden one)."""

    def __init__(self, stream, hidden: tuple[str, ...]):
        self.stream, self.hidden = stream, hidden
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
        with self._lock:
            if self._pending and not self._may_hide(self._pending):
                self.stream.write(self._pending)
                self._pending = ""
        self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._pending and not self._hides(self._pending):
                self.stream.write(self._pending)
            self._pending = ""
        self.stream.flush()
        super().close()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def _hides(self, line: str) -> bool:
        return line.lstrip().startswith(self.hidden)

    def _may_hide(self, start: str) -> bool:
        """Whether a line that starts with `start` may turn out to be hidden."""
        start = start.lstrip()
        return self._hides(start) or any(hidden.startswith(start) for hidden in self.hidden)


def print_outcome(outcome: SweepOutcome, sweep, resume_command: str, ui_url: str | None = None) -> None:
    """The table of trials, the best one, and where to look at them in the MLflow UI (`ui_url`: the
    address the user will open, default the tracking server, or `mlflow ui`'s for a database store)."""
    from alignprop_ray.sweep.summary import format_table

    print("\n" + format_table(outcome.rows, sweep))
    if outcome.fronts:
        print()
    for label, front in outcome.fronts.items():
        print(f"Pareto front ({label}): {', '.join(r['trial'] for r in front)}")
    if outcome.best:
        best = outcome.best
        print("\n" + "\n".join(outcome.selection.explain()))
        print(f"best adapter: {best['adapter'] or '(no checkpoint)'} (what --register registers)")
        if best.get("run_id"):
            print(f"  also in MLflow: runs:/{best['run_id']}/adapter")
    if outcome.interrupted:
        print(f"\ninterrupted: continue with `{resume_command}`")
    print(f"\nMLflow: parent run {outcome.parent_run_id} in {outcome.tracking_uri}")
    print_ui_links(outcome, sweep.config.tune.best_metric, ui_url)


def print_ui_links(outcome: SweepOutcome, best_metric: tuple[str, str], ui_url: str | None = None) -> None:
    """How to open the UI on the store, then links to the experiment's runs table (best `best_metric`
    first: a (metric, mode) pair) and to the compare page of every trial that has a run."""
    from alignprop_ray.sweep.tracking import compare_url, runs_table_url, ui_base, ui_command

    uri = outcome.tracking_uri
    if uri.startswith("databricks") or outcome.experiment_id is None:  # Databricks links differ
        return
    base = ui_base(uri, ui_url)
    command = ui_command(uri, base)
    if command:
        print(f"  open the UI:     {command}")
    print(f"  runs table:      {runs_table_url(base, outcome.experiment_id, *best_metric)}")
    run_ids = [row["run_id"] for row in outcome.rows if row.get("run_id")]
    if run_ids:
        print(f"  compare trials:  {compare_url(base, run_ids, [outcome.experiment_id])}")
