"""Methods leaderboard: every chosen method tuned by its own search, the same budget, against a tuned baseline.

    python studies/methods.py --dataset digits                       # minutes on a laptop
    python studies/methods.py --dataset cifar100 --teacher resnet32x4 --student resnet8x4 --epochs 240 \\
        --num-samples 40 --gpus-per-trial 0.25 --max-concurrent 16 --address auto
    python studies/methods.py --methods kd dkd mylab.methods:LogitMSE   # your own method beside the standard ones

Each method (and the baseline, method none) gets an Optuna TPE + ASHA search of --num-samples trials over its
own declared parameters (`kdtune methods show NAME`) and the learning rate, all at the same epochs; the first
trial of each is the method's published setting. The best point of each search, chosen on validation, is then
re-run over --seeds seeds and reported on test with its difference from the tuned baseline and the 95% interval.
A method the model pair cannot run (a feature method with an ensemble teacher, attention transfer without two
feature maps to link) is listed as skipped, with the reason. 'NAME+ls' is NAME with logit standardisation on
(Sun et al. 2024) for the logit methods (kd, dkd, dist, ctkd).
"""
from kdtune.options import finish, spec_from_args, study_parser, user_errors
from kdtune.tags import BASELINE_LABEL
from kdtune.spaces import MethodSpace, candidate_link_sets
from kdtune.study import Search, run_study

DEFAULT_METHODS = ["kd", "kd+ls", "at", "rkd", "crd", "dkd", "dist", "ctkd"]
LS_SUFFIX = "+ls"


def main() -> int:
    parser = study_parser(__doc__.splitlines()[0])
    parser.set_defaults(seeds=3)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                        help="built-in methods (kdtune methods list), NAME+ls, or package.module:Class")
    parser.add_argument("--num-samples", type=int, default=8, help="trials of each method's search (and the baseline's)")
    parser.add_argument("--grace-period", type=int, default=3, help="ASHA: epochs before a trial can be stopped")
    parser.add_argument("--reduction-factor", type=int, default=3, help="ASHA: keep 1/N trials at each rung")
    parser.add_argument("--searcher-seed", type=int, default=0)
    parser.add_argument("--search-lr", metavar="LOW,HIGH",
                        help="learning-rate range searched for every method and the baseline (log scale); default: "
                             "1/3x to 3x the recipe's")
    args = parser.parse_args()
    with user_errors():
        spec = spec_from_args(args, name="methods", variants=[])
        searches, baseline = method_searches(spec, args)
    spec = spec_from_args(args, name="methods", variants=[], searches=searches, baseline_search=baseline,
                          label_header="method",
                          title=f"Methods, each tuned by a search of {args.num_samples} trials (lr included), best "
                                f"point re-run over {args.seeds} seed(s), {args.dataset}")
    return finish(run_study, spec)


def method_searches(spec, args) -> tuple[dict, Search]:
    """One search per method label (the same budget, lr searched for each) and the baseline's own."""
    from kdtune import distill
    from kdtune.errors import ConfigError
    from kdtune.resolve import common_links, feature_map_links, models_of, recipe_of

    recipe = recipe_of(spec)
    lr = spec.overrides.get("lr") or recipe["student_recipe"]["lr"]
    lr_range = _lr_range(args.search_lr, float(lr))
    teacher, student = models_of(spec, recipe)
    links = tuple(candidate_link_sets(common_links(teacher, student)))
    maps = tuple(candidate_link_sets(feature_map_links(spec)))
    budget = dict(num_samples=args.num_samples, grace_period=args.grace_period,
                  reduction_factor=args.reduction_factor, seed=args.searcher_seed)
    searches = {}
    for label in args.methods:
        method, standardize = (label[:-len(LS_SUFFIX)], True) if label.endswith(LS_SUFFIX) else (label, False)
        if method == "none" or label == BASELINE_LABEL:
            raise ConfigError(f"--methods {label}: the baseline (method none) is always tuned and listed; "
                              "leave it out of --methods")
        if label in searches:
            raise ConfigError(f"--methods {label}: listed twice")
        declared = {p.name for p in distill.method_class(method).params}
        if standardize and "logit_standardize" not in declared:
            raise ConfigError(f"--methods {label}: method {method!r} has no logit_standardize switch; the logit "
                              "methods that do: " + ", ".join(m for m in distill.method_names() if "logit_standardize"
                                                              in {p.name for p in distill.method_class(m).params}))
        space = MethodSpace((method,), maps if method == "at" else links, recipe={"lr": lr_range},
                            fixed={**spec.overrides, **({"logit_standardize": True} if standardize else {})})
        first = {**space.default_point(method), "lr": float(lr)}
        if "links" in declared and space.link_sets:
            first["links"] = space.link_sets[-1]  # every shared link (the last candidate)
        searches[label] = Search(suggest=space, points_to_evaluate=[first], **budget)
    baseline = Search(suggest=MethodSpace(("none",), recipe={"lr": lr_range}),
                      points_to_evaluate=[{"method": "none", "lr": float(lr)}], **budget)
    return searches, baseline


def _lr_range(text: str | None, lr: float) -> tuple[float, float]:
    from kdtune.errors import ConfigError

    if not text:
        return (lr / 3, lr * 3)
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--search-lr {text!r}: expected LOW,HIGH, e.g. 0.003,0.03") from None
    if not 0 < low <= high:
        raise ConfigError(f"--search-lr {text!r}: expected 0 < LOW <= HIGH")
    return (low, high)


if __name__ == "__main__":
    raise SystemExit(main())
