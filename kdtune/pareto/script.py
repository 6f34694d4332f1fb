"""The Pareto options of the study scripts (studies/pareto.py, studies/search.py --pareto): the candidates and
budgets from the command line, the StudySpec they make, and what the script prints."""
from __future__ import annotations

from kdtune.train.costs import RUNTIMES
from kdtune.errors import ConfigError
from kdtune.pareto import COSTS, Pareto


# ---- the study scripts' options (studies/pareto.py, studies/search.py --pareto) ---------------------------

# the size knobs searched by default, for each built-in dataset's student: width multipliers around it
DEFAULT_FAMILIES = {
    "digits_student": ("vgg", {"blocks": ["8x16x16"], "fc": ["32"], "width": ["0.25", "0.5", "1", "2", "4"]}),
    "vgg7": ("vgg", {"width": ["0.125", "0.25", "0.5", "1"]}),
    "cnn2": ("cnn", {"width": ["0.25", "0.5", "1", "2"]}),
    "cnn1": ("cnn", {"blocks": ["16"], "fc": ["32"], "width": ["0.5", "1", "2", "4"]}),
    "mlp_2x800": ("mlp", {"hidden": ["800x800"], "width": ["0.125", "0.25", "0.5", "1"]}),
    "mlp_3x800": ("mlp", {"hidden": ["800x800x800"], "width": ["0.125", "0.25", "0.5", "1"]}),
    "mlp_2x3072": ("mlp", {"hidden": ["3072x3072"], "width": ["0.125", "0.25", "0.5", "1"]}),
    "mlp_student": ("mlp", {"hidden": ["64"], "width": ["0.25", "0.5", "1", "2", "4"]}),
    "wrn_10_4": ("wrn", {"depth": ["10", "16"], "widen": ["1", "2", "4"]}),
    "wrn_22_4": ("wrn", {"depth": ["10", "16", "22"], "widen": ["1", "2", "4"]}),
    "resnet8": ("resnet", {"depth": ["8", "14", "20", "26", "32"]}),
}


def add_options(parser) -> None:
    from kdtune.models.families import family_help

    group = parser.add_argument_group("Pareto: candidate students, costs and budgets")
    group.add_argument("--students", nargs="+", metavar="REF",
                       help="candidate students: built-in names, torchvision:NAME, timm:NAME, package.module:factory "
                            "or family references such as wrn:depth=16,widen=2")
    group.add_argument("--family", help=f"a family searched over its knobs' values (--knob); {family_help()}")
    group.add_argument("--knob", action="append", default=[], metavar="NAME=V1,V2",
                       help="values of a family knob, e.g. --knob depth=10,16 --knob widen=1,2 (every combination)")
    group.add_argument("--cost", choices=list(COSTS), default="latency",
                       help="the front's cost axis (latency: batch 1; all four are always recorded)")
    group.add_argument("--latency-budget-ms", type=float,
                       help="the champion: the most accurate front member (on validation) whose batch-1 latency is "
                            "at most this")
    group.add_argument("--max-params", type=int, help="the champion: the most accurate front member with at most "
                                                      "this many parameters")
    group.add_argument("--sampler", choices=["tpe", "nsga2"], default="tpe", help="Optuna's multi-objective sampler")
    group.add_argument("--asha", action="store_true",
                       help="early stopping with ASHA on validation accuracy alone (it takes one metric); off by "
                            "default: it stops small students first, which the front needs")
    group.add_argument("--latency-warmup", type=int, default=5, help="untimed forward passes before timing")
    group.add_argument("--latency-runtime", choices=list(RUNTIMES), default="torch",
                       help="time candidates in eager PyTorch on the trial's device, or as ONNX in onnxruntime on the "
                            "CPU (pip install 'kdtune[export]')")
    group.add_argument("--latency-repeats", type=int, default=21, help="timed forward passes; the median is kept")
    group.add_argument("--latency-batch", type=int, default=256, help="the batch of the per-image latency")
    group.add_argument("--quantize", choices=["int8"],
                       help="int8: each front member's post-training int8 twin (onnxruntime, calibrated on training "
                            "samples) is measured and registered beside it; needs --latency-runtime onnxruntime")
    group.add_argument("--calibration-samples", type=int, default=256,
                       help="--quantize: training samples the int8 activation ranges are calibrated on")


def parse_knobs(pairs: list[str]) -> dict[str, list[str]]:
    choices: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, values = pair.partition("=")
        listed = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name.strip() or not listed:
            raise ConfigError(f"--knob {pair!r}: expected NAME=V1,V2,..., e.g. --knob widen=1,2,4")
        if name.strip() in choices:
            raise ConfigError(f"--knob {name.strip()}: given twice; list all its values once")
        choices[name.strip()] = listed
    return choices


def plan_from_args(args, default_student: str) -> Pareto:
    """The Pareto plan of a script's options; a bad value raises one ConfigError line."""
    from kdtune.models.families import FAMILIES, expand_family

    students = list(args.students or [])
    if args.knob and not args.family:
        raise ConfigError(f"--knob {args.knob[0]}: give the family it belongs to with --family "
                          f"({', '.join(FAMILIES)})")
    if args.family:
        students += expand_family(args.family, parse_knobs(args.knob))
    if not students:
        if default_student not in DEFAULT_FAMILIES:
            raise ConfigError(f"student {default_student}: no default family of sizes to search; give --students "
                              f"REF ... or --family NAME --knob KNOB=V1,V2 (families: {', '.join(FAMILIES)})")
        students = expand_family(*DEFAULT_FAMILIES[default_student])
    plan = Pareto(students=students, cost=args.cost, latency_budget_ms=args.latency_budget_ms,
                  max_params=args.max_params, early_stopping=args.asha, sampler=args.sampler,
                  latency_batch=args.latency_batch, warmup=args.latency_warmup, repeats=args.latency_repeats,
                  latency_runtime=args.latency_runtime, quantize=args.quantize,
                  calibration_samples=args.calibration_samples)
    plan.check()
    plan.refs()
    return plan


def start_points(plan: Pareto, params: dict) -> list[dict]:
    """Known points to start the search from: `params` at the first, middle and last candidate as listed (a
    family lists its sizes in the order of the knobs' values), so the front spans the sizes from the start."""
    specs = list(plan.refs())
    if len(specs) == 1:
        return [dict(params)]
    chosen = list(dict.fromkeys([specs[0], specs[len(specs) // 2], specs[-1]]))
    return [{**params, "student": student} for student in chosen]


def run_script(args, name: str = "pareto") -> int:
    """A study script's Pareto study (studies/pareto.py, studies/search.py --pareto): build, run, print."""
    import sys

    from kdtune.errors import KdtuneError
    from kdtune.options import user_errors
    from kdtune.study import run_study

    with user_errors():
        spec = script_spec(args, name)
    try:
        result = run_study(spec)
    except KdtuneError as error:
        print(f"kdtune: error: {error}", file=sys.stderr)
        return 2
    return print_result(result)


def script_spec(args, name: str):
    """The StudySpec of a script's options: candidates, the multi-objective search and the baseline's own
    search over the same students with the same budget."""
    from kdtune.options import spec_from_args
    from kdtune.resolve import common_links, models_of, recipe_of
    from kdtune.spaces import MethodSpace, candidate_link_sets
    from kdtune.study import Search

    plain = spec_from_args(args, name=name, variants=[])
    defaults = recipe_of(plain)
    teacher, student = models_of(plain, defaults)
    plan = plan_from_args(args, student.spec)
    lr = plain.overrides.get("lr") or defaults["student_recipe"]["lr"]
    recipe = _lr_range(args.search_lr, lr)
    # link numbers every candidate shares with the teacher: a link set searched must map onto each student
    common = sorted(set.intersection(*(set(common_links(teacher, ref)) for ref in plan.refs().values())))
    methods = MethodSpace(tuple(args.methods), tuple(candidate_link_sets(common)),
                          fsp_pairs=getattr(args, "fsp_pairs", "") if "fsp" in args.methods else "", recipe=recipe)
    budget = dict(num_samples=args.num_samples, time_budget_s=args.time_budget_s, grace_period=args.grace_period,
                  reduction_factor=args.reduction_factor, seed=args.searcher_seed)
    at_lr = {"lr": lr} if recipe else {}
    known = [{"method": "kd", "temperature": 4.0, "alpha": 0.9, **at_lr}] if "kd" in args.methods else []
    search = Search(suggest=plan.space(methods), points_to_evaluate=[p for k in known for p in start_points(plan, k)],
                    **budget)
    baseline = Search(suggest=plan.space(MethodSpace(("none",), recipe=recipe)),
                      points_to_evaluate=start_points(plan, {"method": "none", **at_lr}), **budget)
    return spec_from_args(args, name=name, variants=[], search=search, baseline_search=baseline, pareto=plan,
                          label_header="student", title=f"Pareto front, {args.dataset}")


def _lr_range(text: str | None, lr: float) -> dict:
    if text == "none":
        return {}
    if text:
        try:
            low, high = (float(v) for v in text.split(","))
        except ValueError:
            raise ConfigError(f"--search-lr {text!r}: expected LOW,HIGH, e.g. 0.003,0.03") from None
        return {"lr": (low, high)}
    return {"lr": (lr / 3, lr * 3)}


def print_result(result) -> int:
    """The search, the front, the champion and what measuring latency cost; 1 when a budget found no member."""
    import sys

    from kdtune.options import search_table

    run = result.kind
    print()
    print(search_table(result.phases["search"]))
    print()
    print(run.table())
    for phase, trials in result.phases.items():
        for trial in trials:
            if trial.failed:
                print(f"failed ({phase}): {trial.label} seed={trial.seed}: {trial.error}")
    decision = result.registration
    if decision:
        print(f"\nchampion: {decision.name} version {decision.version} -> @{decision.alias}: {decision.reason}")
    name = decision.name if decision else (result.spec.register_as or "NAME")
    print(f"registered {sum(1 for r in run.rows if r.version)} front member(s) (kdtune models pareto {name} "
          "lists them)")
    share = run.seconds / result.wall_time_s if result.wall_time_s else 0.0
    print(f"wall time {result.wall_time_s:.1f}s; latency measurement {run.seconds:.1f}s ({100 * share:.1f}% of it); "
          f"trial training time {result.training_time_s:.1f}s")
    print(f"mlflow: {result.tracking_uri} experiment {result.experiment_id}, study run {result.parent_run_id}")
    if run.plan.budget_text() and run.selected is None:
        print(f"kdtune: error: no front member meets the budget ({run.plan.budget_text()}); the champion is "
              "unchanged", file=sys.stderr)
        return 1
    return 0
