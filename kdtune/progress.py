"""A study's progress on the console: one line per phase, instead of Ray Tune's status tables.

    progress = PhaseProgress("grid", runs=6, label_header="T")      # a Ray Tune Callback
    with quiet_tune():                                              # Ray's own tables and tracebacks off
        tune.Tuner(..., run_config=tune.RunConfig(callbacks=[progress], verbose=0)).fit()

On a terminal the line is rewritten in place (carriage return) as trials report; elsewhere (a log file, a
`ray job` log, a pipe) a plain line is printed when a trial ends and every `interval_s` seconds in between:

    grid: 3/6 runs done (1 failed), 2 running | best val 97.92% (T=2 lr=0.03) | 41s elapsed, ~35s left

A grid phase counts runs (one setting x one seed: one student and its MLflow run, fused trials hold several), a
search phase counts trials (one each). A failure is always a line of its own, with its one-line reason and where
Ray wrote the traceback; a retry says so. The final results table is not printed here (kdtune/options.py).

The callback is pickled with the Tuner's run config (a resumed study gets it back), so it keeps no stream or
clock state until `setup`, and it derives its counts from the trials Tune hands it, restored ones included.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time

from ray.tune import Callback

from kdtune.records import OBJECTIVE
from kdtune.scoped import environment_restored, logger_level

REFRESH_S = 0.5  # a terminal's line is redrawn at most this often (and on every event)

_open_lines: list = []  # progress objects whose terminal line has no newline yet (finish_lines ends them)


class PhaseProgress(Callback):
    def __init__(self, phase: str, total: int | None = None, *, unit: str | None = None, label_header: str = "setting",
                 max_failures: int = 0, time_budget_s: float | None = None, interval_s: float = 60.0,
                 stream=None, tty: bool | None = None, echo=None, clock=time.monotonic):
        self.phase = phase
        self.total = total  # None: Tune's number of samples (setup)
        self.unit = unit or ("trials" if "search" in phase else "runs")
        self.label_header = label_header
        self.max_failures = max_failures
        self.time_budget_s = time_budget_s
        self.interval_s = interval_s
        self.stream, self.tty, self.clock = stream, tty, clock
        self.echo = echo  # a study's own echo (run_study(spec, echo=...)): plain lines through it, never a stream
        self._reset()

    def _reset(self):
        self._started = None
        self._first_running = None  # when a trial of this run was first seen running
        self._fraction_at_start = None  # work restored as done (a resumed phase): not counted in the rate
        self._last_draw = None
        self._last_line_text = ""
        self._line_open = False
        self._reported_errors: set = set()  # (trial id, member index) of failures already printed
        self._members: dict = {}  # trial id -> ((training_iteration, status), members)
        self._results: dict = {}  # trial id -> its newest result

    def __getstate__(self):  # pickled with the run config: settings only, never a stream or a run's state
        state = self.__dict__.copy()
        state["stream"] = None if state.get("stream") in (sys.stdout, sys.stderr) else state.get("stream")
        state["echo"] = None  # a resumed study's callback writes to stdout
        state.update(_started=None, _first_running=None, _fraction_at_start=None, _last_draw=None, _last_line_text="", _line_open=False,
                     _reported_errors=set(), _members={}, _results={})
        return state

    # ---- Tune's hooks ---------------------------------------------------------------------------------
    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self._reset()
        if self.total is None and total_num_samples:
            self.total = int(total_num_samples)
        self._started = self.clock()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._running_since()
        self._draw(trials, event=False)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._running_since()
        self._results[trial.trial_id] = result  # Tune sets trial.last_result only after its callbacks ran
        self._report_member_failures(trial, result)
        self._draw(trials, event=False)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._report_member_failures(trial, trial.last_result or {})
        self._draw(trials, event=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        failures = _num_failures(trial)
        limit = f" of {self.max_failures + 1}" if self.max_failures else ""
        self._say(f"{self.phase}: {self._who(trial)} failed (attempt {failures}{limit}), retrying from its last "
                  f"checkpoint: {_reason(trial)}")
        self._draw(trials, event=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        key = (trial.trial_id, None)
        if key not in self._reported_errors:
            self._reported_errors.add(key)
            where = _error_location(trial)
            where = f" (traceback: {where})" if where else ""
            self._say(f"{self.phase}: failed: {self._who(trial)}: {_reason(trial)}{where}")
        self._draw(trials, event=True)

    def on_step_end(self, iteration, trials, **info):
        self._draw(trials, event=False)

    def on_experiment_end(self, trials, **info):
        self._draw(trials, event=True, final=True)

    def _running_since(self) -> None:
        if self._first_running is None:
            self._first_running = self.clock()

    # ---- what the line says ----------------------------------------------------------------------------
    def line(self, trials, now: float | None = None, final: bool = False, counts: dict | None = None) -> str:
        """The progress line for these trials."""
        now = self.clock() if now is None else now
        counts = counts or self._count(trials)
        total = max(self.total or 0, counts["members"])
        done = f"{counts['done']}/{total} {self.unit} done" if total else f"{counts['done']} {self.unit} done"
        notes = [f"{counts['failed']} failed"] if counts["failed"] else []
        if counts["stopped"]:
            notes.append(f"{counts['stopped']} stopped early")
        parts = [done + (f" ({', '.join(notes)})" if notes else "")]
        if counts["running"] and not final:
            parts[0] += f", {counts['running']} running"
        best = counts["best"]
        if best is not None:
            member, value, _ = best
            parts.append(f"best {_metric_text(value)} ({self._setting(member)})")
        elapsed = now - self._started if self._started is not None else 0.0
        if counts["running"] and self._first_running is None:
            self._first_running = now
        timing = f"{_duration(elapsed)} elapsed"
        if final:
            timing = f"finished in {_duration(elapsed)}"
        else:
            working = now - self._first_running if self._first_running is not None else elapsed
            left = self._time_left(counts["fraction"], working, elapsed)
            timing += f", ~{_duration(left)} left" if left is not None else ", time left: estimating"
        parts.append(timing)
        return f"{self.phase}: " + " | ".join(parts)

    def _setting(self, member: dict) -> str:
        """A member's label (whole) and tuned point; a bare value is named by the table's header (T=2)."""
        from kdtune.tags import BASELINE_LABEL

        label, header = str(member.get("label", "")), self.label_header or ""
        bare = label and not any(c in label for c in " =,") and label != BASELINE_LABEL
        if bare and header and header != "setting" and not any(c in header for c in " ,"):
            label = f"{header}={label}"
        return f"{label} {member.get('point') or ''}".strip()

    def _time_left(self, fraction: float, working: float, elapsed: float) -> float | None:
        """The work left at the rate of this run so far (the time since its first trial started running: Ray's
        scheduling before it is not a rate), capped by a search's time budget."""
        if self._fraction_at_start is None:
            self._fraction_at_start = fraction
        gained = fraction - self._fraction_at_start
        left = None
        if fraction >= 1.0:
            left = 0.0
        elif gained > 1e-6 and working > 0:
            left = working * (1.0 - fraction) / gained
        if self.time_budget_s is not None:
            budget_left = max(0.0, self.time_budget_s - elapsed)
            left = budget_left if left is None else min(left, budget_left)
        return left

    def _count(self, trials) -> dict:
        done = failed = stopped = running = members_seen = 0
        work = 0.0
        best = None
        for trial in trials:
            members = self._members_of(trial)
            members_seen += len(members)
            for m in members:
                metrics = m.get("metrics") or {}
                epoch, epochs = metrics.get("epoch"), metrics.get("epochs_total")
                ended = trial.status in ("TERMINATED", "ERROR")
                finished = epoch is not None and epoch == epochs
                if m.get("error") or (trial.status == "ERROR" and not finished):
                    done += 1
                    failed += 1
                    work += 1.0
                    continue
                value = metrics.get(OBJECTIVE.metric)
                if isinstance(value, (int, float)):  # ties broken as selection breaks them (the table agrees)
                    rank = OBJECTIVE.rank(float(value), metrics.get(OBJECTIVE.tie_metric))
                    if best is None or rank > best[2]:
                        best = (m, float(value), rank)
                if finished or ended:
                    done += 1
                    work += 1.0
                    if not finished and epoch is not None:
                        stopped += 1  # ended before its last epoch: the scheduler (ASHA) stopped it
                else:
                    running += trial.status == "RUNNING"
                    if epoch and epochs:
                        work += min(1.0, epoch / epochs)
        total = max(self.total or 0, members_seen)
        return {"done": done, "failed": failed, "stopped": stopped, "running": running, "members": members_seen,
                "best": best, "fraction": work / total if total else 0.0}

    def _members_of(self, trial) -> list[dict]:
        """Each member of a trial: label, point, seed, error and last metrics (from its last report, else its
        config), cached per report."""
        result = trial.last_result or {}
        newest = self._results.get(trial.trial_id)
        if newest is not None and (newest.get("training_iteration") or 0) > (result.get("training_iteration") or 0):
            result = newest
        key = (result.get("training_iteration"), trial.status)
        cached = self._members.get(trial.trial_id)
        if cached and cached[0] == key:
            return cached[1]
        members = _reported_members(result)
        if members is None:
            members = [{"label": m.label, "point": m.point, "seed": m.seed, "error": None, "metrics": {}}
                       for m in _config_members(trial.config or {})]
        self._members[trial.trial_id] = (key, members)
        return members

    def _who(self, trial) -> str:
        members = self._members_of(trial)
        if not members:
            return str(trial.trial_id)
        labels = ", ".join(self._setting(m) for m in members)
        return f"{labels} seed {members[0].get('seed', 0)}"

    def _report_member_failures(self, trial, result: dict) -> None:
        """A fused trial's member that failed alone (its loss diverged): the trial goes on, its failure is shown."""
        members = _reported_members(result) or []
        if len(members) < 2:
            return  # a trial of one member fails as a trial (on_trial_error)
        for index, m in enumerate(members):
            key = (trial.trial_id, index)
            if m.get("error") and key not in self._reported_errors:
                self._reported_errors.add(key)
                setting = self._setting(m)
                self._say(f"{self.phase}: failed: {setting} seed {m.get('seed', 0)}: {_one_line(m['error'])}")

    # ---- writing ---------------------------------------------------------------------------------------
    def _out(self):
        return self.stream if self.stream is not None else sys.stdout

    def _is_tty(self) -> bool:
        if self.echo is not None:
            return False
        if self.tty is not None:
            return self.tty
        try:
            return bool(self._out().isatty())
        except (AttributeError, ValueError):
            return False

    def _draw(self, trials, event: bool, final: bool = False) -> None:
        now = self.clock()
        if self._started is None:
            self._started = now
        tty = self._is_tty()
        if not final:
            since = None if self._last_draw is None else now - self._last_draw
            due = since is None or since >= (REFRESH_S if tty else self.interval_s)
            if not (event or due):
                return
        counts = self._count(trials)
        total = max(self.total or 0, counts["members"])
        if event and not final and not tty and total and counts["done"] >= total:
            return  # the phase's last trial ended: its closing line follows (on_experiment_end)
        text = self.line(trials, now, final=final, counts=counts)
        self._last_draw = now
        out = self._out()
        if tty and _fits(text, out):
            if text != self._last_line_text or final or not self._line_open:
                out.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
            self._set_open(not final)
        else:  # a plain line (a log, or a line too long to rewrite in place)
            self._end_line()
            changed = text.split(" | ")[:-1] != self._last_line_text.split(" | ")[:-1]
            # an event or a terminal's redraw: only when the counts or the best changed; an interval: always
            if final or changed or (not tty and not event):
                self._plain(text)
        self._last_line_text = text
        out.flush()

    def _say(self, text: str) -> None:
        """A line of its own (a failure, a retry), above the progress line."""
        out = self._out()
        if self._line_open:
            out.write("\r\x1b[K")
            self._set_open(False)
            self._last_draw = None  # redraw the progress line under it at the next hook
        self._plain(text)
        out.flush()

    def _plain(self, text: str) -> None:
        if self.echo is not None:
            self.echo(text)
        else:
            self._out().write(text + "\n")

    def _set_open(self, is_open: bool) -> None:
        self._line_open = is_open
        if is_open and self not in _open_lines:
            _open_lines.append(self)
        elif not is_open and self in _open_lines:
            _open_lines.remove(self)

    def _end_line(self) -> None:
        if self._line_open:
            self._out().write("\n")
            self._set_open(False)


def finish_lines() -> None:
    """End a terminal line a phase left open (Tune stopped by an exception before its last hook)."""
    for progress in list(_open_lines):
        progress._end_line()
        progress._out().flush()


@contextlib.contextmanager
def quiet_tune():
    """While a phase runs: Ray Tune's legacy output engine (the one that honours verbose=0; the newer one prints
    its own tables even when silent), no traceback per failed trial (TUNE_PRINT_ALL_TRIAL_ERRORS=0; our callback
    prints the reason and the error file; set it to 1 to see Ray's), no excessive-sync warning (kdtune/study.py,
    _run_config), no closing "Trials did not complete" list (each failure was already a line), and no Optuna
    line per study created and trial told (the searcher's). Restored afterwards: nothing here outlives the phase."""
    values = {"RAY_AIR_NEW_OUTPUT": "0",
              "TUNE_PRINT_ALL_TRIAL_ERRORS": os.environ.get("TUNE_PRINT_ALL_TRIAL_ERRORS", "0"),
              "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S":
                  os.environ.get("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")}
    tune_logger = logging.getLogger("ray.tune.tune")
    quiet = _DropIncompleteTrials()
    with environment_restored(values), logger_level("optuna", logging.WARNING):
        os.environ.update(values)
        tune_logger.addFilter(quiet)
        try:
            yield
        finally:
            tune_logger.removeFilter(quiet)
            finish_lines()


class _DropIncompleteTrials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Trials did not complete")


# ---- helpers ------------------------------------------------------------------------------------------

def _reported_members(result: dict) -> list[dict] | None:
    from kdtune.trial import MEMBERS_KEY

    try:
        members = json.loads(result[MEMBERS_KEY])
    except (KeyError, TypeError, ValueError):
        return None
    return members if isinstance(members, list) else None


def _config_members(config: dict):
    from kdtune.trial import members_of

    try:
        return members_of(config)
    except Exception:  # a config of another shape: counted as one member, labelled by its trial
        return []


def _num_failures(trial) -> int:
    metadata = getattr(trial, "run_metadata", None)
    return int(getattr(metadata, "num_failures", 0) or getattr(trial, "num_failures", 0) or 0)


def _reason(trial) -> str:
    """The last line of the trial's error file: the exception and its message."""
    path = getattr(trial, "error_file", None)
    if path:
        try:
            with open(path) as f:
                lines = [line for line in f.read().strip().splitlines() if line.strip()]
            if lines:
                return _one_line(lines[-1])
        except OSError:
            pass
    error = getattr(trial, "error_msg", None)
    return _one_line(error) if error else "unknown error"


def _error_location(trial) -> str | None:
    """Where the trial's error file lives in the study folder (Tune copies it there from the driver's staging
    folder), else that staging copy."""
    try:
        name = trial.run_metadata.error_filename
        kind = trial.storage.storage_filesystem.type_name
        base = trial.path
    except Exception:  # not a trial of this Ray's shape (or not stored): the file Ray gives
        return getattr(trial, "error_file", None)
    if not name or not base:
        return getattr(trial, "error_file", None)
    return f"{base}/{name}" if kind == "local" else f"{kind}://{base}/{name}"


def _one_line(text: str, limit: int = 500) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[-1] if lines else str(text)
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _metric_text(value: float) -> str:
    return f"val {100 * value:.2f}%" if OBJECTIVE.metric.endswith("acc") else f"{OBJECTIVE.metric} {value:.4g}"


def _duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _fits(text: str, stream) -> bool:
    """Whether the line fits the terminal: a wrapped line cannot be rewritten in place, and it is never cut."""
    try:
        width = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        width = shutil.get_terminal_size().columns
    return len(text) < width
