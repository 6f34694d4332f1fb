"""Command-line options every study script shares, and the one way a study script ends.

    parser = study_parser("Temperature sweep (seed 000 Table 3)")
    args = parser.parse_args()
    spec = spec_from_args(args, name="temperature_sweep", variants=[...])
    finish(run_study, spec)      # prints the table; a KdtuneError becomes one line on stderr and exit 2
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from kdtune import tracking
from kdtune.config import BATCHED_MODES, TrialConfig
from kdtune.errors import ConfigError, KdtuneError
from kdtune.results import baseline_tuning, verdict


def study_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = parser.add_argument_group("where it runs")
    where.add_argument("--address", help="Ray cluster address (auto, or HEAD_IP:6379); default: a local Ray")
    where.add_argument("--storage", help="Tune results and checkpoints, and the study folder: a local or shared "
                                         "(NFS) folder, or s3://BUCKET/PREFIX on a cluster (AWS_ENDPOINT_URL for "
                                         "an S3-compatible store); checked before the study starts; "
                                         "default: <store>/ray_results")
    where.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                       help="MLflow tracking server (http://host:5000); default: $MLFLOW_TRACKING_URI, else an "
                            "embedded server over <store>/mlflow.db")
    where.add_argument("--store", default=".kdtune", help="local folder for the embedded MLflow store and Tune results")
    where.add_argument("--data-dir", help="where datasets live or are downloaded to (default: $KDTUNE_DATA_DIR or "
                                          "~/.cache/kdtune/data)")
    where.add_argument("--no-download", action="store_true", help="never download a dataset; fail if it is missing")
    what = parser.add_argument_group("what it trains")
    what.add_argument("--dataset", default="digits",
                      help="a built-in name (digits: bundled, no download; cifar10, cifar100, mnist, fashion_mnist, "
                           "svhn, svhn28, notmnist, imagenet32), folder:PATH (train/ and test/ of class folders), "
                           "npz:PATH (x_train, y_train, x_test, y_test), or package.module:function (see README)")
    what.add_argument("--image-size", type=int, help="folder datasets: resize every image to this many pixels square")
    what.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                      help="stream batches from disk (default: only when the dataset exceeds the memory budget, "
                           "$KDTUNE_MEMORY_BUDGET_MB)")
    what.add_argument("--teacher", help="teacher: a built-in name, torchvision:NAME, timm:NAME or "
                                        "package.module:factory (default: the dataset's, e.g. vgg16 for CIFAR)")
    what.add_argument("--student", help="student, in the same forms (default: the dataset's, e.g. vgg7 for CIFAR)")
    what.add_argument("--teacher-source", action="append",
                      help="teacher weights: 'pretrained' (the library's weights, fine-tuned "
                           "for --teacher-epochs), 'train' (a new one, now), 'train:S' (a new one with seed S), "
                           "models:/name@alias, or a .pt file; default: the registered teacher for this dataset "
                           "(if trained on these samples), else train one. Given several times: an ensemble "
                           "teacher, the soft target the members' averaged probabilities at each trial's T")
    what.add_argument("--epochs", type=int, help="student epochs (default: the dataset recipe's)")
    what.add_argument("--teacher-epochs", type=int, help="teacher epochs when it must be trained")
    what.add_argument("--lr", type=float, help="student learning rate (default: the dataset recipe's)")
    what.add_argument("--batch-size", type=int, help="student batch size (default: the dataset recipe's)")
    what.add_argument("--precision", choices=["fp32", "bf16"], help="bf16 autocast (GPUs, CPUs with AMX)")
    what.add_argument("--seeds", type=int, default=1, help="repeats of every configuration (seeds 0..N-1)")
    what.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="any other trial config value for every student trial, e.g. --set weight_decay=5e-4")
    what.add_argument("--tune", action="append", default=None, metavar="KEY=V1,V2,...",
                      help="recipe values tried for every setting, the baseline included, each setting then "
                           "selected on validation at its own best value, e.g. --tune lr=0.003,0.01,0.03 "
                           "(several --tune: every combination); --tune none: no tuning")
    what.add_argument("--select-with-failures", action="store_true",
                      help="let a setting with failed seeds be chosen as best (by default it is flagged and "
                           "not chosen: its mean covers only the seeds that survived)")
    how = parser.add_argument_group("resources")
    how.add_argument("--cpus-per-trial", type=float, default=1.0)
    how.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractions pack trials, e.g. 0.25")
    how.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    how.add_argument("--fuse", default="auto", metavar="off|auto|N",
                     help="grid settings that share batches (same seed, batch size, epochs, first-stage epochs, "
                          "augmentation; any method) train together in one trial, the teacher run once per batch, up "
                          "to N per trial (auto, the default: as many as keep every trial slot busy, at most 8); "
                          "each keeps its own MLflow run and table row")
    how.add_argument("--batched", choices=list(BATCHED_MODES), default=None,
                     help="fused trials: step the members as one vmap-batched computation (kd and none methods, SGD, "
                          "one student architecture, no dropout): auto = on CUDA only, on = also on a CPU, off = "
                          "never; members that cannot be batched step one after the other (default: auto)")
    how.add_argument("--reuse-actors", action=argparse.BooleanOptionalAction, default=None,
                     help="run the next trial in a finished trial's process (default: on a single-node Ray only; "
                          "on a multi-node cluster every trial starts its own process, so trials spread over nodes)")
    how.add_argument("--resume", metavar="STUDY_FOLDER",
                     help="continue a stopped study from the folder it printed at its start")
    how.add_argument("--margin", type=float, default=0.0,
                     help="registry gate: the best student becomes champion only if its mean validation accuracy beats "
                          "the current champion's by more than this (else it is registered as challenger)")
    how.add_argument("--register-as", help="registered model name for the best student "
                                           "(default: kdtune-<dataset>-<student>)")
    return parser


def parse_set_options(pairs: list[str]) -> dict:
    """--set KEY=VALUE: a shared trial key or a parameter a method of the study declares (checked, with the
    value, when the study is resolved: kdtune/resolve.py)."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set weight_decay=5e-4")
        values[key.strip()] = value
    return values


def parse_tune_options(pairs: list[str] | None) -> dict:
    """--tune lr=0.003,0.01,0.03 --tune batch_size=32,64 -> {"lr": [...], "batch_size": [...]}."""
    if not pairs or pairs == ["none"]:
        return {}
    known = TrialConfig.field_names()
    tune = {}
    for pair in pairs:
        key, sep, values = pair.partition("=")
        if not sep or not key or not values.strip():
            raise ConfigError(f"--tune {pair!r}: expected KEY=V1,V2,..., e.g. --tune lr=0.003,0.01,0.03")
        if key not in known:
            raise ConfigError(f"--tune {key}: unknown config key; allowed: {', '.join(sorted(known))}")
        if key in tune:
            raise ConfigError(f"--tune {key}: given twice; list all its values once, e.g. --tune {key}=1,2,3")
        tune[key] = [_number_or_text(v.strip()) for v in values.split(",") if v.strip()]
    return tune


def _number_or_text(text: str):
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def spec_from_args(args: argparse.Namespace, name: str, variants: list[dict], **spec_fields):
    """The StudySpec of a script's options; a bad --set or --tune ends as one line and exit status 2."""
    with user_errors():
        return _spec_from_args(args, name, variants, **spec_fields)


def _spec_from_args(args: argparse.Namespace, name: str, variants: list[dict], **spec_fields):
    from kdtune.study import StudySpec

    overrides = parse_set_options(args.set)
    for key in ("epochs", "lr", "batch_size", "precision", "batched"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    teacher_overrides = {"epochs": args.teacher_epochs} if args.teacher_epochs is not None else {}
    if args.precision:
        teacher_overrides["precision"] = args.precision
    fields = dict(
        name=name, dataset=args.dataset, variants=variants, overrides=overrides,
        teacher_overrides=teacher_overrides, seeds=args.seeds, teacher=args.teacher, student=args.student,
        teacher_source=_teacher_sources(args.teacher_source), image_size=args.image_size, stream=args.stream,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, reuse_actors=args.reuse_actors,
        address=args.address,
        storage=args.storage, tracking_uri=args.tracking_uri, store_dir=args.store, data_dir=args.data_dir,
        download=not args.no_download, register_as=args.register_as, resume=args.resume,
        margin=args.margin, tune=parse_tune_options(args.tune), allow_failed_best=args.select_with_failures,
        fuse=args.fuse,
    )
    fields.update(spec_fields)
    return StudySpec(**fields)


def _teacher_sources(values: list[str] | None):
    """--teacher-source given once: that source; several times: the list of an ensemble's members."""
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


@contextlib.contextmanager
def user_errors():
    """For the work a script does before `finish` (e.g. reading the recipe to shape its variants): a user's
    mistake ends as it does inside a study, one line on stderr and exit status 2."""
    try:
        yield
    except KdtuneError as error:
        print(f"kdtune: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def shared_tracking(args: argparse.Namespace):
    """For scripts that run several studies: one embedded MLflow server for all of them (unless
    --tracking-uri names one), so the assistant a first study registers is there for the next."""
    from kdtune.tracking import tracking_server

    try:
        with tracking_server(args.tracking_uri, args.store) as uri:
            args.tracking_uri = uri
            yield uri
    except KdtuneError as error:
        print(f"kdtune: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def finish(run, spec, table=None, summary=None) -> int:
    """Run the study and print its table (`table(result)` for a paper-specific shape) and the sentence on what
    it shows (from `summary(result)` when the table joins several studies' rows); a user error becomes one line
    on stderr and exit status 2."""
    try:
        result = run(spec)
    except KdtuneError as error:
        print(f"kdtune: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print()
    if "search" in result.phases:
        print(search_table(result.phases["search"]))
        print()
    if spec.title:
        print(spec.title)
    print(table(result) if table else result.table())
    print(verdict(summary(result) if summary else result.summary, tuning_of(result)))
    for phase, trials in result.phases.items():
        for trial in trials:
            if trial.failed:
                point = f" {trial.point}" if trial.point else ""
                print(f"failed ({phase}): {trial.label}{point} seed={trial.seed}: {trial.error}")
    share = result.training_time_s / result.wall_time_s if result.wall_time_s else 0.0
    decision = result.registration
    registered = (f"registered {decision.name} version {decision.version} as @{decision.alias}: {decision.reason}"
                  if decision else "nothing registered")
    print(f"\nbest (by validation): {result.best_label}; {registered}")
    print(f"wall time {result.wall_time_s:.1f}s; trial training time {result.training_time_s:.1f}s "
          f"(sum over trials = {share:.2f} x wall time)")
    print(where_results_are(result))
    return 0


def where_results_are(result) -> str:
    """The study's place in MLflow: a link while its server still answers, else how to browse it (the embedded
    server stopped with the study, so its URL would be a dead link)."""
    ids = f"experiment {result.experiment_id}, study run {result.parent_run_id}"
    if not result.tracking_uri.startswith(("http://", "https://")):  # a database store: no server to link to
        return f"mlflow: {ids} in {tracking.ui_link(result.tracking_uri, result.experiment_id)}"
    if tracking.server_answers(result.tracking_uri):
        return f"mlflow: {tracking.ui_link(result.tracking_uri, result.experiment_id)} ({ids})"
    return f"mlflow: {ids}; browse them with: kdtune mlflow serve --store {result.spec.store_dir}"


def tuning_of(result) -> str | None:
    """How the study's baseline was tuned (results.baseline_tuning)."""
    search = result.spec.baseline_search
    return baseline_tuning(result.spec.tune, search.num_samples if search else 0)


def search_table(trials, top: int = 10) -> str:
    """The search phase: best trials by validation accuracy, and how many epochs each one ran."""
    ranked = sorted(trials, key=lambda t: t.metrics.get("val_acc", -1.0), reverse=True)
    stopped = sum(1 for t in trials if t.stopped)
    epochs = sum(t.metrics.get("epoch", 0) for t in trials)
    lines = [f"search: {len(trials)} trials, {stopped} stopped early by ASHA, {epochs} epochs in all; best {top}:",
             f"{'val acc':>8}  {'epochs':>6}  configuration"]
    for t in ranked[:top]:
        val = t.metrics.get("val_acc")
        note = " (stopped)" if t.stopped else ""
        lines.append(f"{'-' if val is None else f'{100 * val:.2f}%':>8}  {t.metrics.get('epoch', 0):>6}  "
                     f"{t.label}{note}{' FAILED' if t.failed else ''}")
    return "\n".join(lines)
