"""The study's progress line (kdtune/progress.py): its text, a terminal's line rewritten in place, plain lines
elsewhere, failures on lines of their own; fed fake Tune trials and events. One real study checks Ray's status
tables are gone."""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import sys
from types import SimpleNamespace

import pytest

from conftest import run_script
from kdtune import progress as progress_module
from kdtune.progress import PhaseProgress, quiet_tune
from kdtune.trial import MEMBERS_KEY


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def trial(trial_id, labels, seed=0, status="PENDING", point=""):
    config = {"group": [{"label": label, "method": "kd", **({"point": point} if point else {})} for label in labels],
              "seed": seed}
    return SimpleNamespace(trial_id=trial_id, status=status, config=config, last_result={}, error_file=None,
                           run_metadata=SimpleNamespace(num_failures=0, error_filename=None))


def report(t, epochs_total=4, iteration=None, **members):
    """A result of trial t: each member label -> (epoch, val_acc) or an error text."""
    rows = []
    for m in t.config["group"]:
        value = members[m["label"]]
        error = value if isinstance(value, str) else None
        metrics = {} if error else {"epoch": value[0], "epochs_total": epochs_total, "val_acc": value[1]}
        rows.append({"label": m["label"], "point": m.get("point", ""), "overrides": {}, "seed": t.config["seed"],
                     "error": error, "metrics": metrics})
    lead = next((r["metrics"] for r in rows if r["metrics"]), {})
    result = {**lead, "training_iteration": iteration or lead.get("epoch", 1), MEMBERS_KEY: json.dumps(rows)}
    t.last_result = result
    return result


def make(phase="grid", total=3, tty=False, **kwargs):
    clock, stream = Clock(), Stream(tty)
    p = PhaseProgress(phase, total, stream=stream, clock=clock, **kwargs)
    p.setup(total_num_samples=total)
    return p, clock, stream


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the width a fake terminal reports (shutil.get_terminal_size)


# ---- the line's text ----------------------------------------------------------------------------------

def test_the_line_says_phase_runs_done_failed_running_best_setting_and_time_left():
    p, clock, _ = make(total=4, label_header="T")
    a, b = trial("a", ["baseline"], status="RUNNING"), trial("b", ["2"], status="RUNNING")
    c = trial("c", ["5 lr=0.03 with a long label that Ray's table would have cut"], status="RUNNING")
    d = trial("d", ["10"], status="PENDING")
    trials = [a, b, c, d]
    assert p.line(trials) == "grid: 0/4 runs done, 3 running | 0s elapsed, time left: estimating"
    report(a, baseline=(4, 0.90))
    report(b, **{"2": (2, 0.95)})
    a.status, c.status = "TERMINATED", "ERROR"
    clock.now += 50  # 2.5 of 4 runs' work in 50 s: 1.5 left at that rate
    assert p.line(trials) == ("grid: 2/4 runs done (1 failed), 1 running | best val 95.00% (T=2) | 50s elapsed, "
                              "~30s left")
    report(b, **{"2": (4, 0.91)})
    b.status = "TERMINATED"
    assert "best val 91.00% (T=2)" in p.line(trials)  # 91% > 90%: T=2 is still the best
    report(c, **{c.config["group"][0]["label"]: (2, 0.99)}, iteration=2)  # it reported 99% before it failed
    assert "best val 91.00% (T=2)" in p.line(trials)  # a failed run is never the best


def test_a_tie_on_validation_is_broken_as_the_table_breaks_it_by_the_lower_validation_loss():
    p, _, _ = make(total=2, label_header="T")
    a, b = trial("a", ["baseline"], status="TERMINATED"), trial("b", ["2"], status="TERMINATED")
    report(a, baseline=(4, 0.90))
    report(b, **{"2": (4, 0.90)})
    for t, loss in ((a, 0.40), (b, 0.30)):  # the same accuracy: T=2 has the lower loss, so the table picks it
        rows = json.loads(t.last_result[MEMBERS_KEY])
        rows[0]["metrics"]["val_loss"] = loss
        t.last_result[MEMBERS_KEY] = json.dumps(rows)
    assert "best val 90.00% (T=2)" in p.line([a, b])


@pytest.mark.parametrize("header, label, point, shown", [
    ("T", "2", "lr=0.03", "T=2 lr=0.03"), ("T", "baseline", "", "baseline"), ("method", "kd", "", "method=kd"),
    ("T", "T=2", "", "T=2"), ("configuration", "kd T=4 a=0.5", "", "kd T=4 a=0.5"),
    ("T, alpha", "2", "", "2"), ("setting", "huge lr", "", "huge lr")])
def test_a_bare_label_is_named_by_the_tables_header_and_any_other_is_shown_as_it_is(header, label, point, shown):
    p, _, _ = make(label_header=header)
    assert p._setting({"label": label, "point": point}) == shown


def test_before_any_progress_the_time_left_is_being_estimated_and_a_failed_label_is_shown_whole():
    p, clock, _ = make(total=2)
    t = trial("a", ["kd T=3.21 a=0.612 beta=0.05 lr=0.0301 weight_decay=0.0005"], status="RUNNING")
    clock.now += 7
    line = p.line([t])
    assert line == "grid: 0/2 runs done, 1 running | 7s elapsed, time left: estimating"
    report(t, **{t.config["group"][0]["label"]: (1, 0.5)})
    assert "best val 50.00% (kd T=3.21 a=0.612 beta=0.05 lr=0.0301 weight_decay=0.0005) |" in p.line([t])


def test_a_fused_trial_counts_each_member_as_a_run():
    p, _, _ = make(total=6)
    t = trial("a", ["baseline", "2", "5"], status="RUNNING")
    report(t, baseline=(4, 0.8), **{"2": (2, 0.7), "5": "TrainingDiverged: loss term 'soft' became nan"})
    line = p.line([t])
    assert line.startswith("grid: 2/6 runs done (1 failed), 1 running | best val 80.00% (baseline) |")


def test_a_search_counts_trials_notes_early_stops_and_caps_the_estimate_at_its_time_budget():
    p, clock, _ = make(phase="search_kd", total=10, time_budget_s=60)
    trials = []
    for i in range(4):
        t = trial(str(i), [f"kd T={i + 1}"], status="TERMINATED")
        report(t, **{f"kd T={i + 1}": (4 if i == 0 else 1, 0.5 + i / 100)})  # three stopped by ASHA at epoch 1
        trials.append(t)
    clock.now += 50
    line = p.line(trials)
    assert line.startswith("search_kd: 4/10 trials done (3 stopped early) | best val 53.00% (kd T=4) |")
    assert line.endswith("50s elapsed, ~10s left")  # 75 s at this rate, but the budget ends in 10 s


def test_a_resumed_phase_counts_restored_runs_as_done_but_not_in_its_rate():
    p, clock, _ = make(total=4)
    done = [trial(str(i), [str(i)], status="TERMINATED") for i in range(2)]
    for t in done:
        report(t, **{t.config["group"][0]["label"]: (4, 0.6)})
    running = trial("r", ["9"], status="RUNNING")
    trials = [*done, running]
    assert "2/4 runs done" in p.line(trials) and "time left: estimating" in p.line(trials)
    clock.now += 20
    report(running, **{"9": (2, 0.7)})  # half a run in 20 s: 1.5 runs left take 60 s
    assert p.line(trials).endswith("20s elapsed, ~1m00s left")


# ---- a terminal: one line, rewritten in place ---------------------------------------------------------

def test_on_a_terminal_the_line_is_rewritten_in_place_at_most_twice_a_second_and_ended_at_the_phase_end():
    p, clock, stream = make(total=2, tty=True)
    a, b = trial("a", ["baseline"], status="RUNNING"), trial("b", ["2"], status="RUNNING")
    trials = [a, b]
    p.on_trial_start(iteration=1, trials=trials, trial=a)
    for _ in range(4):
        clock.now += 0.1
        p.on_step_end(iteration=1, trials=trials)
    text = stream.getvalue()
    assert text.count("\r") == 1 and "\n" not in text  # throttled: one drawing in the first half second
    clock.now += 0.6
    p.on_trial_result(iteration=2, trials=trials, trial=a, result=report(a, epochs_total=2, baseline=(1, 0.9)))
    assert stream.getvalue().count("\r") == 2
    assert stream.getvalue().endswith("\rgrid: 0/2 runs done, 2 running | best val 90.00% (baseline) | 1s elapsed, "
                                      "~3s left\x1b[K")
    p.on_step_end(iteration=3, trials=trials)  # due, but the same text: nothing written
    assert stream.getvalue().count("\r") == 2
    report(a, epochs_total=2, baseline=(2, 0.9))
    report(b, epochs_total=2, **{"2": (2, 0.95)})
    a.status = b.status = "TERMINATED"
    clock.now += 1
    p.on_trial_complete(iteration=4, trials=trials, trial=a)
    p.on_experiment_end(trials=trials)
    assert stream.getvalue().endswith("\rgrid: 2/2 runs done | best val 95.00% (2) | finished in 2s\x1b[K\n")
    assert stream.getvalue().count("\n") == 1


def test_on_a_terminal_a_failure_is_a_line_of_its_own_above_the_progress_line(tmp_path):
    p, clock, stream = make(total=2, tty=True, max_failures=2)
    a = trial("a", ["5"], status="RUNNING")
    p.on_trial_start(iteration=1, trials=[a], trial=a)
    error = tmp_path / "error.txt"
    error.write_text("Failure # 1 (occurred at 2026-01-01)\nTraceback (most recent call last):\n  File ...\n"
                     "kdtune.errors.TrainingDiverged: 5: loss term 'soft' became nan in epoch 1\n")
    a.error_file, a.run_metadata.num_failures = str(error), 1
    p.on_trial_recover(iteration=2, trials=[a], trial=a)
    assert stream.getvalue().endswith(
        "\r\x1b[Kgrid: 5 seed 0 failed (attempt 1 of 3), retrying from its last checkpoint: "
        "kdtune.errors.TrainingDiverged: 5: loss term 'soft' became nan in epoch 1\n"
        "\rgrid: 0/2 runs done, 1 running | 0s elapsed, time left: estimating\x1b[K")
    a.status = "ERROR"
    clock.now += 1
    p.on_trial_error(iteration=3, trials=[a], trial=a)
    lines = stream.getvalue().split("\n")
    assert lines[-2].endswith(f"\x1b[K\r\x1b[Kgrid: failed: 5 seed 0: kdtune.errors.TrainingDiverged: 5: loss term "
                              f"'soft' became nan in epoch 1 (traceback: {error})")  # the open line cleared first
    assert lines[-1].startswith("\rgrid: 1/2 runs done (1 failed)")


def test_a_terminal_too_narrow_for_the_line_gets_plain_lines_never_a_cut_label(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    label = "kd T=3.21 a=0.612 beta=0.05 lr=0.0301"
    p, clock, stream = make(total=1, tty=True)
    t = trial("a", [label], status="RUNNING")
    p.on_trial_start(iteration=1, trials=[t], trial=t)
    clock.now += 1
    p.on_trial_result(iteration=2, trials=[t], trial=t, result=report(t, **{label: (1, 0.5)}))
    clock.now += 1
    p.on_step_end(iteration=3, trials=[t])  # only the time changed: no new line
    text = stream.getvalue()
    assert "\r" not in text
    assert text.splitlines() == ["grid: 0/1 runs done, 1 running | 0s elapsed, time left: estimating",
                                 f"grid: 0/1 runs done, 1 running | best val 50.00% ({label}) | 1s elapsed, ~3s left"]


# ---- not a terminal: plain lines ----------------------------------------------------------------------

def test_elsewhere_a_plain_line_for_each_finished_trial_and_every_interval_and_one_at_the_end(tmp_path):
    p, clock, stream = make(total=3, tty=False, interval_s=30)
    a, b, c = (trial(x, [x], status="RUNNING") for x in "abc")
    trials = [a, b, c]
    p.on_trial_start(iteration=1, trials=trials, trial=a)
    for second in range(29):
        clock.now += 1
        p.on_step_end(iteration=second, trials=trials)
        p.on_trial_result(iteration=second, trials=trials, trial=b, result=report(b, b=(1, 0.4)))
    assert len(stream.getvalue().splitlines()) == 1  # the first line, then nothing within the interval
    clock.now += 1
    p.on_step_end(iteration=30, trials=trials)
    assert len(stream.getvalue().splitlines()) == 2  # the interval passed
    report(a, a=(4, 0.8))
    a.status = "TERMINATED"
    p.on_trial_complete(iteration=31, trials=trials, trial=a)  # a finished trial: a line at once
    error = tmp_path / "error.txt"
    error.write_text("Failure # 1\nRuntimeError: CUDA out of memory\n")
    c.status, c.error_file = "ERROR", str(error)
    p.on_trial_error(iteration=32, trials=trials, trial=c)
    report(b, b=(4, 0.9))
    b.status = "TERMINATED"
    clock.now += 5
    p.on_trial_complete(iteration=33, trials=trials, trial=b)  # the last one: the closing line says it
    p.on_experiment_end(trials=trials)
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines()[2:] == [
        "grid: 1/3 runs done, 2 running | best val 80.00% (a) | 30s elapsed, ~42s left",  # 1.25 of 3 in 30 s
        f"grid: failed: c seed 0: RuntimeError: CUDA out of memory (traceback: {error})",
        "grid: 2/3 runs done (1 failed), 1 running | best val 80.00% (a) | 30s elapsed, ~10s left",
        "grid: 3/3 runs done (1 failed) | best val 90.00% (b) | finished in 35s",
    ]


def test_the_rate_is_measured_from_when_the_first_trial_runs_not_while_ray_places_it():
    p, clock, _ = make(total=2)
    a, b = trial("a", ["a"]), trial("b", ["b"])
    p.line([a, b])
    clock.now += 30  # Ray starting the trial processes
    a.status = b.status = "RUNNING"
    p.line([a, b])
    clock.now += 10
    report(a, a=(2, 0.5))
    report(b, b=(2, 0.5))  # half of the work in 10 s of running: 10 s left, not 40
    assert p.line([a, b]).endswith("| 40s elapsed, ~10s left")


def test_in_a_log_the_rate_starts_with_the_first_trial_even_between_lines():
    p, clock, stream = make(total=2, tty=False)
    a, b = trial("a", ["a"]), trial("b", ["b"])
    p.on_step_end(iteration=1, trials=[a, b])
    clock.now += 30
    a.status = "RUNNING"
    p.on_trial_start(iteration=2, trials=[a, b], trial=a)  # within the interval: no line, but the clock starts
    clock.now += 10
    report(a, a=(4, 0.5))
    a.status = "TERMINATED"
    p.on_trial_complete(iteration=3, trials=[a, b], trial=a)
    assert stream.getvalue().splitlines()[-1].endswith("| 40s elapsed, ~10s left")


def test_in_a_log_events_that_change_nothing_it_says_add_no_line():
    p, clock, stream = make(total=3, tty=False)
    a, b, c = (trial(x, [x], status="RUNNING") for x in "abc")
    p.on_trial_start(iteration=1, trials=[a, b, c], trial=a)
    report(a, a=(4, 0.5))
    report(b, b=(4, 0.4))
    a.status = b.status = "TERMINATED"
    clock.now += 2
    p.on_trial_complete(iteration=2, trials=[a, b, c], trial=a)  # both ended in the same step: one line
    p.on_trial_complete(iteration=2, trials=[a, b, c], trial=b)
    assert len(stream.getvalue().splitlines()) == 2


def test_a_fused_members_failure_is_shown_once_while_its_trial_goes_on():
    p, clock, stream = make(total=2, tty=False)
    t = trial("a", ["baseline", "huge lr"], status="RUNNING")
    for epoch in (1, 2):
        clock.now += 1
        p.on_trial_result(iteration=epoch, trials=[t], trial=t, result=report(
            t, baseline=(epoch, 0.5), **{"huge lr": "TrainingDiverged: loss term 'hard' became nan in epoch 1"}))
    failures = [line for line in stream.getvalue().splitlines() if "failed:" in line]
    assert failures == ["grid: failed: huge lr seed 0: TrainingDiverged: loss term 'hard' became nan in epoch 1"]


def test_a_study_run_with_its_own_echo_gets_the_plain_lines_through_it():
    lines = []
    p, clock, stream = make(total=1, tty=True, echo=lines.append)
    t = trial("a", ["baseline"], status="RUNNING")
    p.on_trial_start(iteration=1, trials=[t], trial=t)
    report(t, baseline=(4, 0.7))
    t.status = "TERMINATED"
    clock.now += 3
    p.on_trial_complete(iteration=2, trials=[t], trial=t)
    p.on_experiment_end(trials=[t])
    assert stream.getvalue() == ""
    assert lines == ["grid: 0/1 runs done, 1 running | 0s elapsed, time left: estimating",
                     "grid: 1/1 runs done | best val 70.00% (baseline) | finished in 3s"]


# ---- what Tune keeps of it, and what is quietened -------------------------------------------------------

def test_it_pickles_with_the_run_config_without_its_stream_or_state():
    p = PhaseProgress("confirm", 4, stream=sys.stdout, label_header="T")
    p.setup(total_num_samples=4)
    p._reported_errors.add(("x", None))
    again = pickle.loads(pickle.dumps(p))
    assert again.stream is None and again._reported_errors == set() and again._started is None
    assert (again.phase, again.total, again.label_header) == ("confirm", 4, "T")


def test_quiet_tune_switches_off_rays_tables_and_tracebacks_only_while_a_phase_runs(monkeypatch):
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    monkeypatch.setenv("TUNE_PRINT_ALL_TRIAL_ERRORS", "1")  # a user who wants Ray's tracebacks keeps them
    logger = logging.getLogger("ray.tune.tune")  # Tune's own logger (it does not propagate to the root)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        with quiet_tune():
            assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
            assert os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] == "1"
            logger.error("Trials did not complete: %s", ["a"])
            logger.error("something else")
        logger.error("Trials did not complete: %s", ["b"])
    finally:
        logger.removeHandler(handler)
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ
    assert [r.getMessage() for r in records] == ["something else", "Trials did not complete: ['b']"]


def test_an_open_terminal_line_is_ended_when_a_phase_stops_early():
    p, _, stream = make(total=2, tty=True)
    t = trial("a", ["baseline"], status="RUNNING")
    p.on_trial_start(iteration=1, trials=[t], trial=t)
    assert not stream.getvalue().endswith("\n")
    progress_module.finish_lines()
    assert stream.getvalue().endswith("\x1b[K\n")


# ---- a real study ---------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_a_study_prints_its_progress_lines_and_no_ray_status_table(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # its own embedded server, under tmp_path
    result = run_script("temperature_sweep.py", "--dataset", "digits", "--temperatures", "2", "--epochs", "2",
                        "--tune", "none", "--seeds", "1", "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out, err = result.stdout, result.stderr
    for noise in ("== Status ==", "Trial name", "Number of trials", "Logical resource usage", "Trial status",
                  "Configuration for experiment"):
        assert noise not in out and noise not in err
    assert "\r" not in out  # not a terminal: plain lines
    lines = [line for line in out.splitlines() if line.startswith("grid: ")]
    assert lines and all(re.match(r"grid: \d/2 runs done", line) for line in lines)
    best = re.search(r"^best \(by validation\): (\S+);", out, re.M).group(1)
    shown = "baseline" if best == "baseline" else f"T={best}"  # the whole label, named as the table's column
    assert re.fullmatch(rf"grid: 2/2 runs done \| best val \d+\.\d\d% \({re.escape(shown)}\) \| finished in \d+s",
                        lines[-1]), lines
    table = out[out.index("Temperature sweep (seed 000 Table 3)"):]
    assert [line.split()[0] for line in table.splitlines()[2:4]] == ["baseline", "2"]  # the table stays
