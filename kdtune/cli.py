"""The `kdtune` command: what a user does outside a study script.

    kdtune mlflow serve                         the embedded tracking server over .kdtune/
    kdtune teacher train|list                   train and register a dataset's teacher; list teachers
    kdtune study list|show|report|resume        past studies, their tables and reports; continue a stopped one
    kdtune models list|promote|export           registered students; move 'champion' through the gate; export weights
    kdtune models pareto NAME                   the Pareto front a study registered, cheapest first, with its costs
    kdtune models links MODEL --dataset D       a model's module paths and output shapes, to link layers by path
    kdtune methods list|show NAME               distillation methods: parameters, allowed values, ranges, papers

Every command but `mlflow serve` takes --tracking-uri (default: the server already serving --store, else an
embedded one started for the command). Errors are one line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kdtune.errors import ConfigError, KdtuneError, TrackingError
from kdtune.tags import BEST_TAG, REGISTERED_TAG, ROLE_STUDY, ROLE_TAG, STUDY_TAG, TEACHER_TAG


# ---- mlflow -----------------------------------------------------------------------------------------

def cmd_mlflow_serve(args) -> int:
    from kdtune.mlflow_auth import check_access, server_settings
    from kdtune.storage import check_storage
    from kdtune.tracking import EmbeddedServer, UI_SUFFIX, check_backend_store_uri, redact

    if EmbeddedServer.running_uri(args.store):
        raise TrackingError(f"a server already serves {Path(args.store).resolve()} at "
                            f"{EmbeddedServer.running_uri(args.store)}")
    if args.workers is not None and args.workers < 1:
        raise TrackingError(f"--workers {args.workers}: give 1 or more")
    Path(args.store).mkdir(parents=True, exist_ok=True)
    # the database URI may come from the environment (cluster.yaml does that), never shown by `ps`
    backend = args.backend_store_uri or os.environ.get("MLFLOW_BACKEND_STORE_URI") or None
    server = EmbeddedServer(args.store, port=args.port, announce=True, backend_store_uri=backend,
                            artifacts_destination=args.artifacts_destination, host=args.host, workers=args.workers)
    # everything the server needs is checked first, each in one line (the database within 30 s)
    check_backend_store_uri(server.backend_uri)
    if args.artifacts_destination and "://" in args.artifacts_destination:
        check_storage(args.artifacts_destination, option="--artifacts-destination")
    if args.auth:
        server.extra_env, server.extra_args = server_settings(server.store_dir)
    elif args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without --auth: whoever reaches port {server.port} can write "
              "runs and move registered models' aliases", file=sys.stderr)
    server.start()
    if args.auth:
        try:
            check_access(server.uri)  # an admin created earlier with another password refuses these credentials
        except TrackingError as error:
            server.stop()
            raise TrackingError(f"{error} (the users of this server are in {server.store_dir / 'basic_auth.db'}: "
                                "use its admin's password, or remove the file to make the admin anew)") from None
    where = f"http://{args.host}:{server.port}" if args.host not in ("127.0.0.1", "0.0.0.0") else server.uri
    pool = (f"; pool {server.pool['MLFLOW_SQLALCHEMYSTORE_POOL_SIZE']}+"
            f"{server.pool['MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW']} connections per worker"
            if len(server.pool) >= 2 else "")
    print(f"MLflow UI: {where}/#/experiments  (backend: {redact(server.backend_uri)}; artifacts: "
          f"{server.artifacts_destination}; {server.workers} worker(s){pool}; log: {server.store_dir / 'server.log'})")
    if args.auth:
        print(f"basic authentication on: admin user {server.extra_env['MLFLOW_AUTH_ADMIN_USERNAME']!r}; clients "
              f"send MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or ~/.kdtune/mlflow-credentials)")
    if args.host == "0.0.0.0":
        print(f"listening on every interface: other machines use http://THIS_HOST:{server.port}")
    print(f"the runs table of an experiment is its URL plus {UI_SUFFIX}; Ctrl-C stops the server", flush=True)
    try:
        while server.process and server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


# ---- teachers ---------------------------------------------------------------------------------------

def cmd_teacher_train(args, client, uri) -> int:
    from kdtune import cluster, teacher_training, teachers, tracking
    from kdtune.resolve import resolve_study
    from kdtune.study import StudySpec

    spec = StudySpec(name="teachers", dataset=args.dataset, teacher=args.teacher, image_size=args.image_size,
                     variants=[{"label": "teacher", "method": "kd"}], data_dir=args.data_dir,
                     download=not args.no_download, teacher_source=args.teacher_source,
                     teacher_overrides={**({"epochs": args.epochs} if args.epochs else {}),
                                        **({"seed": args.seed} if args.seed is not None else {})})
    resolved = resolve_study(spec)  # every bad value stops here, before the run below exists
    plan = resolved.teacher_plan
    if plan.source not in (None, teachers.PRETRAINED, teachers.TRAIN):
        raise ConfigError(f"--teacher-source {plan.source}: `kdtune teacher train` trains from scratch or from "
                          "'pretrained' weights; a teacher from a file or models:/ needs no training")
    config = resolved.teacher_config
    cluster.init_ray(args.address, resolved.user_modules)  # an unreachable cluster or missing resources: before
    cluster.check_resources(args.cpus, args.gpus, options={"CPU": "--cpus", "GPU": "--gpus"})  # the run exists
    experiment_id = tracking.get_or_create_experiment(client, "teachers")
    parent = client.create_run(experiment_id, run_name=f"teacher {resolved.dataset.name} {config.student}",
                               tags={ROLE_TAG: ROLE_STUDY, STUDY_TAG: "teachers"})
    status = "FAILED"
    try:
        context = tracking.TrackingContext(uri, experiment_id, parent.info.run_id)
        # --seed S: another member for an ensemble (alias seedS); champion moves only without --seed
        teacher = teacher_training.train_and_register(config, resolved.dataset, resolved.teacher, context,
                                                      args.cpus, args.gpus, initial_state=plan.initial_state,
                                                      make_champion=args.seed is None)
        status = "FINISHED"
    finally:
        client.set_terminated(parent.info.run_id, status=status)
    print(f"{teacher.source}: test accuracy {teacher.test_acc:.4f}")
    return 0


def cmd_teacher_list(args, client, uri) -> int:
    return _print_models(client, "name LIKE 'kdtune-teacher-%'")


# ---- studies ----------------------------------------------------------------------------------------

def _study_runs(client, study: str | None = None):
    experiments = client.search_experiments()
    ids = [e.experiment_id for e in experiments if study is None or e.name == study]
    if not ids:
        return []
    return client.search_runs(ids, "tags.`kdtune.role` = 'study'", order_by=["attributes.start_time DESC"],
                              max_results=500)


def find_study_run(client, study: str):
    """A study run by its run id, or the latest run of a study (experiment) name."""
    from kdtune import report

    return client.get_run(report.find_study_run(client, study))


def cmd_study_list(args, client, uri) -> int:
    runs = _study_runs(client)
    if not runs:
        print("no studies yet")
        return 0
    print(f"{'study':<28} {'started':<19} {'status':<9} {'best':<22} run id")
    for run in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.info.start_time / 1000))
        print(f"{run.data.tags.get('kdtune.study', '?'):<28} {started:<19} {run.info.status:<9} "
              f"{run.data.tags.get('kdtune.best', '-')[:22]:<22} {run.info.run_id}")
    return 0


def cmd_study_show(args, client, uri) -> int:
    from kdtune.tracking import ui_link

    run = find_study_run(client, args.study)
    print(f"study {run.data.tags.get('kdtune.study')} run {run.info.run_id} ({run.info.status})")
    print(f"  {ui_link(uri, run.info.experiment_id)}")
    for key in (TEACHER_TAG, BEST_TAG, REGISTERED_TAG):
        if key in run.data.tags:
            print(f"  {key.split('.', 1)[1]}: {run.data.tags[key]}")
    try:
        table = Path(client.download_artifacts(run.info.run_id, "results/table.txt")).read_text()
    except Exception:  # a running or failed study has no table yet
        table = "  (no result table yet: the study has not finished)"
    print(table)
    return 0


def cmd_study_report(args, client, uri) -> int:
    from kdtune import report

    run = find_study_run(client, args.study)
    out = Path(args.out or f"kdtune-report-{run.info.run_id[:8]}")
    path = report.log_report(client, run.info.run_id, out)
    print(f"report: {path.resolve()} (also logged to the study run under report/)")
    return 0


def cmd_study_resume(args) -> int:
    """Run a study's recorded command again with --resume: its folder may be local or in an object store."""
    from kdtune.storage import Location, check_storage, is_uri
    from kdtune.study_files import STUDY_FILE

    check_storage(args.folder, option="folder")  # an unreachable bucket: one line, not a hang
    folder = Location.of(args.folder)
    try:
        saved = json.loads((folder / STUDY_FILE).read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{args.folder}: not a kdtune study folder (no readable {STUDY_FILE})") from None
    command = list(saved.get("command") or [])
    if not command:
        raise ConfigError(f"{args.folder}: the study file does not record its command; run the study script with "
                          f"--resume {args.folder}")
    if "--resume" in command:  # a resumed study records its own --resume: replace it
        at = command.index("--resume")
        del command[at:at + 2]
    where = args.folder if is_uri(args.folder) else str(Path(args.folder).resolve())
    return subprocess.call([sys.executable, *command, "--resume", where])


# ---- models -----------------------------------------------------------------------------------------

def _print_models(client, filter_string: str | None = None) -> int:
    models = client.search_registered_models(filter_string=filter_string)
    if not models:
        print("no registered models")
        return 0
    for model in models:
        print(model.name)
        aliases = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in client.search_model_versions(f"name = '{model.name}'"):
            tags = version.tags
            marks = " ".join(f"@{a}" for a in aliases.get(str(version.version), []))
            print(f"  v{version.version:<4} {marks:<22} val mean={tags.get('val_acc_mean', '-')[:6]:<7} "
                  f"test mean={tags.get('test_acc_mean', tags.get('test_acc', '-'))[:6]:<7} "
                  f"study={tags.get('study', '-')} {tags.get('label', '')} {tags.get('tuned', '')}".rstrip())
    return 0


def cmd_models_list(args, client, uri) -> int:
    return _print_models(client, "name LIKE 'kdtune-%'" if not args.all else None)


def cmd_models_promote(args, client, uri) -> int:
    from kdtune import registry

    decision = registry.promote(client, args.name, args.version, margin=args.margin, force=args.force)
    if decision.alias != registry.CHAMPION:
        print(f"{args.name} version {args.version} not promoted: {decision.reason}")
        return 1
    print(f"{args.name} version {args.version} is now @champion: {decision.reason}")
    return 0


def cmd_models_export(args, client, uri) -> int:
    if args.format != "weights":  # onnx | pt2: a runnable file, checked against the registered model
        from kdtune import export
        return export.command(args, client, uri)
    import mlflow
    import torch

    from kdtune.tracking import network_state

    from kdtune import export

    model_uri = args.model if args.model.startswith("models:/") else f"models:/{args.model}"
    if export.is_int8(export.find_version(client, args.model)[0]):
        raise TrackingError(f"model {model_uri} is an int8 ONNX student (--quantize int8): allowed: --format onnx")
    try:
        loaded = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except Exception as error:
        raise TrackingError(f"model {model_uri}: could not be loaded ({type(error).__name__})") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = loaded.state_dict()
    torch.save(network_state(loaded), out)
    meta = {"source": model_uri, "mean": state["mean"].flatten().tolist(), "std": state["std"].flatten().tolist()}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    print(f"{out}: network weights (a --teacher-source for studies); {out.with_suffix('.json')}: input normalisation")
    return 0


def cmd_models_pareto(args, client, uri) -> int:
    from kdtune.pareto.front import list_front

    print(list_front(client, args.name, args.study_run))
    return 0


def cmd_models_links(args) -> int:
    """A model's module paths with their output shapes on the dataset's samples, to write links by path."""
    from kdtune.models.inspect import format_module_table, module_shapes
    from kdtune.models.refs import model_ref
    from kdtune.sources import resolve_dataset

    dataset = resolve_dataset(args.dataset, args.data_dir, not args.no_download, image_size=args.image_size)
    ref = model_ref(args.model)
    ref.check(dataset.num_classes, dataset.input_shape)
    model = ref.build(dataset.num_classes, dataset.input_shape)
    print(f"{ref.spec} on {dataset.name} (samples {tuple(dataset.input_shape)}, {dataset.num_classes} classes)")
    if ref.link_points:
        print("numbered links: " + ", ".join(f"{k}={v}" for k, v in sorted(ref.link_points.items())))
    print(format_module_table(module_shapes(model, dataset.example(2))))
    print("link two modules with links='TEACHER.PATH=STUDENT.PATH' (several: comma-separated)")
    return 0


# ---- the parser -------------------------------------------------------------------------------------

def _tracking_options(parser) -> None:
    parser.add_argument("--tracking-uri", help="an MLflow server; default: the server serving --store, "
                                               "else an embedded one for this command")
    parser.add_argument("--store", default=".kdtune", help="the local kdtune store (mlflow.db, artifacts/)")


def cmd_methods_list(args) -> int:
    from kdtune.distill.catalog import method_list

    print(method_list())
    return 0


def cmd_methods_show(args) -> int:
    from kdtune.distill.catalog import method_show

    print(method_show(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kdtune.export import add_options as export_options

    parser = argparse.ArgumentParser(prog="kdtune", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = parser.add_subparsers(dest="group", required=True, metavar="{mlflow,teacher,study,models,methods}")
    methods = groups.add_parser("methods", help="distillation methods: parameters, ranges, papers").add_subparsers(
        dest="command", required=True)
    methods.add_parser("list", help="every built-in method").set_defaults(func=cmd_methods_list, needs_client=False)
    show = methods.add_parser("show", help="one method's parameters, allowed values, search ranges and paper")
    show.add_argument("name", help="a built-in method or package.module:Class")
    show.set_defaults(func=cmd_methods_show, needs_client=False)

    mlflow = groups.add_parser("mlflow", help="the embedded MLflow tracking server").add_subparsers(
        dest="command", required=True)
    serve = mlflow.add_parser("serve", help="serve the local store (or a database and an object store) until Ctrl-C")
    serve.add_argument("--store", default=".kdtune",
                       help="folder holding the server log, and by default mlflow.db and artifacts/ (default .kdtune)")
    serve.add_argument("--port", type=int, default=5000, help="default 5000")
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to listen on (default 127.0.0.1); 0.0.0.0 on a cluster head, so every "
                            "node reaches it")
    serve.add_argument("--backend-store-uri",
                       help="runs, metrics and the registry: any SQLAlchemy URI MLflow accepts, e.g. "
                            "postgresql://USER:PASSWORD@HOST:5432/mlflow (pip install 'kdtune[postgres]'); "
                            "default: $MLFLOW_BACKEND_STORE_URI, else sqlite:///<store>/mlflow.db")
    serve.add_argument("--artifacts-destination",
                       help="where the server keeps artifacts (models, reports), e.g. s3://BUCKET/mlflow "
                            "(AWS_ENDPOINT_URL for an S3-compatible store; pip install 'kdtune[s3]'); the server "
                            "proxies them, so trials need no credentials; default: <store>/artifacts")
    serve.add_argument("--workers", type=int,
                       help="server worker processes; default: 1 over SQLite, "
                            "4 over a database server (benchmarks/RESULTS.md, tracking)")
    serve.add_argument("--auth", action="store_true",
                       help="MLflow's basic authentication: every request needs the credentials "
                            "(MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD, or USERNAME:PASSWORD in "
                            "~/.kdtune/mlflow-credentials or the file KDTUNE_MLFLOW_CREDENTIALS names), whose user "
                            "becomes the server's admin; pip install 'kdtune[auth]'. Use it on any host but loopback")
    serve.set_defaults(func=cmd_mlflow_serve, needs_client=False)

    teacher = groups.add_parser("teacher", help="teachers in the registry").add_subparsers(dest="command",
                                                                                           required=True)
    train = teacher.add_parser("train", help="train a dataset's teacher and register it as its @champion")
    train.add_argument("--dataset", default="digits")
    train.add_argument("--teacher", help="architecture: a built-in name, torchvision:NAME, timm:NAME or "
                                         "package.module:factory (default: the dataset's)")
    train.add_argument("--teacher-source", choices=["pretrained"],
                       help="start from the library's pretrained weights and fine-tune")
    train.add_argument("--image-size", type=int, help="folder datasets: resize images to this size")
    train.add_argument("--epochs", type=int, help="default: the dataset recipe's teacher epochs")
    train.add_argument("--seed", type=int,
                       help="train with this seed and register it with alias seed<S> (champion only if there is "
                            "none): another member of an ensemble teacher, named "
                            "models:/kdtune-teacher-<dataset>-<arch>@seed<S> in --teacher-source")
    train.add_argument("--data-dir")
    train.add_argument("--no-download", action="store_true")
    train.add_argument("--address", help="a Ray cluster; default: a local Ray")
    train.add_argument("--cpus", type=float, default=1.0)
    train.add_argument("--gpus", type=float, default=0.0)
    train.set_defaults(func=cmd_teacher_train)
    listing = teacher.add_parser("list", help="registered teachers and their versions")
    listing.set_defaults(func=cmd_teacher_list)
    for sub in (train, listing):
        _tracking_options(sub)

    study = groups.add_parser("study", help="past studies").add_subparsers(dest="command", required=True)
    listing = study.add_parser("list", help="every study run, newest first")
    listing.set_defaults(func=cmd_study_list)
    show = study.add_parser("show", help="a study's result table")
    show.add_argument("study", help="a study name (its latest run) or a study run id")
    show.set_defaults(func=cmd_study_show)
    rep = study.add_parser("report", help="rebuild a study's HTML report from MLflow alone and log it")
    rep.add_argument("study", help="a study name (its latest run) or a study run id")
    rep.add_argument("--out", help="output folder (default: kdtune-report-<run id>)")
    rep.set_defaults(func=cmd_study_report)
    for sub in (listing, show, rep):
        _tracking_options(sub)
    resume = study.add_parser("resume", help="continue a stopped study from its folder")
    resume.add_argument("folder", help="the folder the study printed as 'study folder: ...'")
    resume.set_defaults(func=cmd_study_resume, needs_client=False)

    models = groups.add_parser("models", help="registered students").add_subparsers(dest="command", required=True)
    listing = models.add_parser("list", help="registered models, versions, aliases and accuracies")
    listing.add_argument("--all", action="store_true", help="also models not made by kdtune")
    listing.set_defaults(func=cmd_models_list)
    promote = models.add_parser("promote", help="move @champion to a version if it beats the champion")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--margin", type=float, default=0.0)
    promote.add_argument("--force", action="store_true", help="skip the gate")
    promote.set_defaults(func=cmd_models_promote)
    export = models.add_parser("export", help="save a registered model: its weights (.pt), or an ONNX or pt2 file")
    export.add_argument("model", help="name@alias or name/version, e.g. kdtune-digits-digits_student@champion")
    export.add_argument("--out", required=True, help="the file to write")
    export_options(export)  # --format weights|onnx|pt2, --tolerance (kdtune/export.py)
    export.set_defaults(func=cmd_models_export)
    front = models.add_parser("pareto", help="the Pareto front a study registered: members, costs, accuracies")
    front.add_argument("name", help="the registered model, e.g. kdtune-digits-pareto")
    front.add_argument("--study-run", help="the front of this study run (default: the latest registered)")
    front.set_defaults(func=cmd_models_pareto)
    for sub in (listing, promote, export, front):
        _tracking_options(sub)
    links = models.add_parser("links", help="a model's module paths and output shapes (for links by path)")
    links.add_argument("model", help="a built-in name, torchvision:NAME, timm:NAME or package.module:factory")
    links.add_argument("--dataset", default="digits", help="the dataset whose samples the model is built for")
    links.add_argument("--image-size", type=int)
    links.add_argument("--data-dir")
    links.add_argument("--no-download", action="store_true")
    links.set_defaults(func=cmd_models_links, needs_client=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not getattr(args, "needs_client", True):
            return args.func(args)
        from kdtune.tracking import client_for, tracking_server, use_tracking

        with tracking_server(args.tracking_uri, args.store, echo=lambda *a: None) as uri:
            use_tracking(uri)
            return args.func(args, client_for(uri), uri)
    except KdtuneError as error:
        print(f"kdtune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
