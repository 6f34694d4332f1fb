"""Benchmark 4-5: a 16-trial digits study at 2 concurrent trials, timed from the inside.

Run as its own process (the study's driver), so its peak memory is the driver's:

    python -m benchmarks.study_bench --teacher teacher.pt --out result.json

The study is kdtune's own `run_study` (embedded MLflow server, local Ray, reuse of trial processes). The
benchmark only wraps functions to time them: on the driver (server start, Ray start, teacher, Tuner.fit,
registration) and inside each trial process (the trial function is wrapped by a closure shipped by value;
inside it Trainer set-up, MLflow calls, checkpoints and tune.report are timed). Nothing in kdtune is changed.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

from benchmarks.common import vm_hwm_mb

T0 = time.time()

TEMPERATURES = [1, 1.5, 2, 3, 4, 5, 8, 10]  # x 2 seeds = 16 trials


def make_timed_trial(log_path: str):
    """A trial function that calls kdtune's own and records where the trial process spends its time."""

    def distill_trial(config, **kwargs):
        import json as _json
        import os as _os
        import time as _time

        def _vm_hwm_mb():
            # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child of a big process inherits its peak
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))

        def _members_training(last):
            # a fused trial's training time is the sum of its members' shares (each reports its own)
            try:
                members = _json.loads(last["members"])
                return sum(m["metrics"].get("training_time_s", 0.0) for m in members)
            except (KeyError, TypeError, ValueError):
                return last.get("training_time_s")

        entered = _time.time()
        import torch as _torch
        from ray import tune as _tune

        from kdtune.train import trainer as _trainer
        from kdtune import students as _students
        from kdtune import tracking as _tracking
        try:
            from kdtune.trial import distill_trial as real
        except ImportError:  # older layout
            from kdtune.study import distill_trial as real

        spent = {}
        state = {"in_log_model": False, "last": {}}

        def timed(owner, name, key, flag=None):
            original = getattr(owner, name)
            if getattr(original, "_bench_original", None) is not None:
                original = original._bench_original  # a reused process: wrap the original once more

            @functools.wraps(original)
            def wrapper(*args, **kw):
                if key == "checkpoint_save" and state["in_log_model"]:
                    return original(*args, **kw)
                if flag:
                    state[flag] = True
                started = _time.perf_counter()
                try:
                    return original(*args, **kw)
                finally:
                    spent[key] = spent.get(key, 0.0) + _time.perf_counter() - started
                    if flag:
                        state[flag] = False

            wrapper._bench_original = original
            setattr(owner, name, wrapper)

        timed(_trainer.Trainer, "__init__", "trainer_setup")
        timed(_tracking.ChildRun, "__init__", "mlflow_open_run")
        timed(_tracking.ChildRun, "log_epoch", "mlflow_log_epoch")
        timed(_students, "log_weights", "mlflow_log_student", flag="in_log_model")
        timed(_tracking.ChildRun, "set_tags", "mlflow_tags")
        timed(_tracking.ChildRun, "finish", "mlflow_tags")
        timed(_torch, "save", "checkpoint_save")
        original_report = getattr(_tune.report, "_bench_original", _tune.report)

        def report(metrics, *args, **kw):
            state["last"] = dict(metrics)
            started = _time.perf_counter()
            try:
                return original_report(metrics, *args, **kw)
            finally:
                spent["tune_report"] = spent.get("tune_report", 0.0) + _time.perf_counter() - started

        report._bench_original = original_report
        _tune.report = report
        error = None
        try:
            real(config, **kwargs)
        except BaseException as exc:  # recorded, then re-raised: Tune sees the real failure
            error = repr(exc)
            raise
        finally:
            last = state["last"]
            with open(f"/proc/{_os.getpid()}/stat") as handle:
                start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
            with open("/proc/stat") as handle:
                boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
            record = {
                "pid": _os.getpid(), "process_start": boot + start_ticks / _os.sysconf("SC_CLK_TCK"),
                "enter": entered, "exit": _time.time(), "spent": spent, "error": error,
                "training_time_s": _members_training(last), "epochs": last.get("epoch"),
                "members": len(_json.loads(last.get("members", "[]"))),
                "peak_rss_mb": _vm_hwm_mb(),
            }
            with open(log_path, "a") as handle:
                handle.write(_json.dumps(record) + "\n")

    return distill_trial


def instrument_driver(marks: dict):
    """Time the driver's phases by wrapping kdtune's and Ray's functions (same behaviour, timestamps added)."""
    from ray import tune

    from kdtune import cluster, resolve, study, teacher_training, tracking

    def wrap(owner, name, key):
        original = getattr(owner, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            started = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                marks.setdefault(key, []).append((started, time.time()))

        setattr(owner, name, wrapper)

    wrap(tracking.EmbeddedServer, "launch", "mlflow_server_launch")
    wrap(tracking.EmbeddedServer, "wait_ready", "mlflow_server_wait")  # after Ray started, in parallel
    wrap(tracking.EmbeddedServer, "stop", "mlflow_server_stop")
    wrap(resolve, "resolve_dataset", "load_dataset")
    wrap(cluster, "init_ray", "ray_init")
    wrap(teacher_training, "obtain_teacher", "teacher_obtain")
    wrap(getattr(study, "_Study", study), "_teacher_logits_if_useful", "teacher_logits_cache")
    wrap(tune.Tuner, "fit", "tuner_fit")
    wrap(getattr(study, "_Study", study), "_register_best", "register_champion")
    wrap(study, "_log_study_results", "log_study_results")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="digits teacher weights (.pt)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="student epochs (default: the digits recipe's)")
    parser.add_argument("--fuse", default="off", help="the study's fuse option (off | auto | N)")
    args = parser.parse_args()

    imports_started = time.time()
    import ray  # noqa: F401
    from ray import cloudpickle  # noqa: F401

    from kdtune import study
    imported = time.time()

    workdir = tempfile.mkdtemp(prefix="kdtune-bench-study-")
    log_path = os.path.join(workdir, "trials.jsonl")
    marks: dict = {}
    instrument_driver(marks)
    timed = make_timed_trial(log_path)
    timed.__module__ = "__main__"  # ship by value: trial processes need not import this file
    study.distill_trial = timed

    overrides = {"epochs": args.epochs} if args.epochs else {}
    spec = study.StudySpec(
        name="bench_study", dataset="digits", seeds=2, teacher_source=args.teacher, overrides=overrides,
        variants=[{"label": f"T={t:g}", "method": "kd", "temperature": float(t)} for t in TEMPERATURES],
        cpus_per_trial=1, max_concurrent=args.concurrency, store_dir=os.path.join(workdir, "store"),
        register_as="kdtune-bench-digits", title="bench", fuse=args.fuse,
    )
    started = time.time()
    result = study.run_study(spec, echo=lambda line: print(f"  [study] {line}", flush=True))
    finished = time.time()
    trials = []
    if os.path.exists(log_path):
        with open(log_path) as handle:
            trials = [json.loads(line) for line in handle if line.strip()]
    out = {
        "process_start": T0, "imports_s": imported - imports_started, "run_study_started": started,
        "run_study_finished": finished, "wall_time_s": finished - started,
        "result_wall_time_s": result.wall_time_s, "result_training_time_s": result.training_time_s,
        "concurrency": args.concurrency, "n_trials": len(result.trials), "fuse": args.fuse,
        "failed": [t.error for t in result.trials if t.failed],
        "marks": marks, "trials": trials,
        "driver_peak_rss_mb": vm_hwm_mb(),
        "workdir": workdir,
    }
    with open(args.out, "w") as handle:
        json.dump(out, handle, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---- analysis (on the benchmark's side) -------------------------------------------------------------------

def analyse(data: dict):
    """Rows for RESULTS.md and a text breakdown of where the study's time went."""
    from benchmarks.common import Row, check, median

    trials = sorted(data["trials"], key=lambda t: t["enter"])
    n = len(trials) or 1
    conc = data["concurrency"]
    training = sum(t["training_time_s"] or 0.0 for t in trials)
    marks = {k: [(a, b) for a, b in v] for k, v in data["marks"].items()}
    span = lambda key: sum(b - a for a, b in marks.get(key, []))  # noqa: E731
    fit = marks.get("tuner_fit", [(0.0, 0.0)])[0]
    wall = data["wall_time_s"]
    section = f"4. study efficiency (16-trial digits study, {conc} concurrent, 1 CPU each)"
    rows = [
        Row(section, "study wall time (run_study, end to end)", wall, "s"),
        Row(section, "sum of trial training time", training, "s"),
        Row(section, "efficiency: sum(training) / (wall x concurrency)", training / (wall * conc), "x", ">= 0.6",
            check(training / (wall * conc), 0.6)),
        Row(section, "efficiency of the Tuner.fit phase alone", training / ((fit[1] - fit[0]) * conc), "x",
            ">= 0.85", check(training / ((fit[1] - fit[0]) * conc), 0.85)),
    ]
    # per-trial overhead: what each trial costs on top of its training, trial processes included
    per_trial = ((fit[1] - fit[0]) * conc - training) / n
    rows.append(Row(section, "overhead per trial inside Tuner.fit ((fit wall x conc - training) / trials)",
                    per_trial, "s", note="trial process starts and first-trial costs included"))
    first, later, previous = {}, [], {}
    for t in trials:
        if t["pid"] in first:
            later.append(t)
            t["gap"] = t["enter"] - previous[t["pid"]]["exit"]
        else:
            first[t["pid"]] = t
        previous[t["pid"]] = t
    outside = lambda t: t["exit"] - t["enter"] - (t["training_time_s"] or 0.0)  # noqa: E731
    reused = median([outside(t) + t["gap"] for t in later]) if later else float("nan")
    rows.append(Row(section, "overhead per trial in a reused process (trial function minus training, + the gap "
                    "before it)", reused, "s", "<= 0.3 s", check(reused, maximum=0.3)))
    new_process = median([t["enter"] - t["process_start"] + outside(t) for t in first.values()]) - reused
    rows.append(Row(section, "a new trial process, extra (its start-up + its first trial's overhead, minus a reused "
                    "trial's)", new_process, "s", "<= 3 s", check(new_process, maximum=3.0)))
    startup = [t["enter"] - t["process_start"] for t in first.values()]
    first_setup = [t["spent"].get("trainer_setup", 0.0) for t in first.values()]
    rows.append(Row(section, "trial process start-up (spawn, imports, args from the object store; once per process)",
                    median(startup), "s", note=f"{len(first)} processes, reused for {len(later)} later trials"))
    rows.append(Row(section, "Trainer set-up (data to device, models, teacher): first / later trials",
                    median(first_setup), "s",
                    note=f"later: {median([t['spent'].get('trainer_setup', 0.0) for t in later]) * 1000:.0f} ms"))
    keys = ["mlflow_open_run", "mlflow_log_epoch", "mlflow_log_student", "mlflow_tags", "checkpoint_save",
            "tune_report"]
    lines = ["where a reused trial process spends a trial (median over later trials, seconds):"]
    def trial_line(name, values):
        return f"  {name:<44}{median(values):7.2f}"
    lines.append(trial_line("training (epochs: train + validation)", [t["training_time_s"] or 0 for t in later]))
    for key in keys:
        lines.append(trial_line(key, [t["spent"].get(key, 0.0) for t in later]))
    lines.append(trial_line("trial function total", [t["exit"] - t["enter"] for t in later]))
    gaps = []
    by_pid: dict = {}
    for t in trials:
        if t["pid"] in by_pid:
            gaps.append(t["enter"] - by_pid[t["pid"]]["exit"])
        by_pid[t["pid"]] = t
    lines.append(trial_line("gap before the next trial in the same process", gaps or [float("nan")]))
    lines.append("first trial in each process, extra one-off costs (median, seconds):")
    for key in ("mlflow_open_run", "mlflow_log_student", "trainer_setup"):
        lines.append(trial_line(key, [t["spent"].get(key, 0.0) for t in first.values()]))
    lines.append("driver, one-off (seconds):")
    lines.append(f"  {'imports (torch, ray, mlflow, kdtune)':<44}{data['imports_s']:7.2f}")
    for key in ("load_dataset", "mlflow_server_launch", "ray_init", "mlflow_server_wait", "teacher_obtain", "teacher_logits_cache",
                "tuner_fit", "register_champion", "log_study_results", "mlflow_server_stop"):
        if key in marks:
            lines.append(f"  {key:<44}{span(key):7.2f}")
    rows.append(Row(section, "one-off start-up on the driver (MLflow server and Ray, overlapped, + teacher logits)",
                    span("mlflow_server_launch") + span("ray_init") + span("mlflow_server_wait")
                    + span("teacher_logits_cache"), "s"))
    section5 = "5. memory (peak resident set)"
    rows.append(Row(section5, "one trial process (max over trials)", max((t["peak_rss_mb"] for t in trials),
                                                                         default=float("nan")), "MiB"))
    rows.append(Row(section5, "study driver", data["driver_peak_rss_mb"], "MiB"))
    if data.get("failed"):
        lines.append(f"FAILED trials: {data['failed']}")
    return rows, "\n".join(lines)


def analyse_fused(data: dict, unfused: dict | None = None):
    """Rows for the same study with --fuse auto: what a user of the temperature sweep gets (the quickstart)."""
    from benchmarks.common import Row, check

    trials = data["trials"]
    conc = data["concurrency"]
    settings = sum(t.get("members", 1) for t in trials) or 1
    training = sum(t["training_time_s"] or 0.0 for t in trials)
    fit = data["marks"].get("tuner_fit", [(0.0, 0.0)])[0]
    fit_slots = (fit[1] - fit[0]) * conc
    wall = data["wall_time_s"]
    section = (f"4b. the same study fused (--fuse {data.get('fuse')}: {len(trials)} Ray trials of "
               f"{settings // max(1, len(trials))} students)")
    rows = [
        Row(section, "study wall time (run_study, end to end)", wall, "s",
            note=f"unfused: {unfused['wall_time_s']:.1f} s" if unfused else ""),
        Row(section, "sum of member training time (each member's share of its trial)", training, "s"),
        Row(section, "efficiency: sum(training) / (wall x concurrency)", training / (wall * conc), "x", ">= 0.6",
            check(training / (wall * conc), 0.6)),
        Row(section, "efficiency of the Tuner.fit phase alone", training / fit_slots, "x", ">= 0.85",
            check(training / fit_slots, 0.85)),
        Row(section, "overhead per setting inside Tuner.fit ((fit wall x conc - training) / settings)",
            (fit_slots - training) / settings, "s", "<= 0.3 s", check((fit_slots - training) / settings, maximum=0.3)),
    ]
    if data.get("failed"):
        rows.append(Row(section, "FAILED trials", len(data["failed"]), "", note=str(data["failed"])[:200]))
    return rows
