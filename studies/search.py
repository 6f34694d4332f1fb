"""One Optuna TPE + ASHA search over distillation methods and all their settings together.

    python studies/search.py --dataset digits --num-samples 30
    python studies/search.py --dataset cifar10 --num-samples 200 --time-budget-s 36000 --gpus-per-trial 0.25 \\
        --max-concurrent 16 --seeds 3 --address auto

The space is define-by-run (kdtune/spaces.py), so parameters are conditional: T and alpha only where a soft term
exists, beta and the link set only for methods with links, the first-stage length only for two-stage methods,
adversarial weights and the discriminator's learning rate only for adversarial methods. ASHA stops weak trials on their own epoch counter. Then the best
configuration (by validation accuracy) and the baseline are re-run over --seeds seeds and reported on the test
set with the gain over the baseline and its 95% confidence interval.

Fair by construction: every trial searches the learning rate too (--search-lr, default 1/3x to 3x the
recipe's), and the baseline gets a search of its own over the same range with the same budget (--num-samples)
before the confirm phase, so the student trained alone is tuned as well as the distilled ones.
"""
import sys

from kdtune.pareto import script as pareto
from kdtune.options import finish, spec_from_args, study_parser, user_errors
from kdtune.spaces import MethodSpace, candidate_link_sets
from kdtune.resolve import common_links, models_of, recipe_of
from kdtune.study import Search, run_study

KNOWN_GOOD = [{"method": "kd", "temperature": 4.0, "alpha": 0.9}]


def main() -> int:
    parser = study_parser(__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["kd", "links", "hints", "adversarial"],
                        help="methods to search over; 'fsp' needs a model pair with FSP pairs (e.g. ResNets)")
    parser.add_argument("--fsp-pairs", default="1-2,3-4,5-6", help="FSP layer pairs when 'fsp' is searched")
    parser.add_argument("--num-samples", type=int, default=30, help="trials the searcher proposes")
    parser.add_argument("--time-budget-s", type=float, help="stop proposing trials after this many seconds")
    parser.add_argument("--grace-period", type=int, default=2, help="ASHA: epochs before a trial can be stopped")
    parser.add_argument("--reduction-factor", type=int, default=3, help="ASHA: keep 1/N trials at each rung")
    parser.add_argument("--searcher-seed", type=int, default=0)
    parser.add_argument("--warm-start", type=int, nargs="?", const=3, default=0, metavar="N",
                        help="first run the N (default 3) best configurations earlier studies with the same dataset, "
                             "teacher and student recorded in MLflow (by validation accuracy; the baseline search "
                             "likewise from earlier tuned baselines); prints which came from which study")
    parser.add_argument("--search-lr", metavar="LOW,HIGH",
                        help="learning-rate range searched for every method and the baseline (log scale); "
                             "default: 1/3x to 3x the recipe's; 'none' keeps the recipe's lr")
    parser.add_argument("--pareto", action="store_true",
                        help="search validation accuracy and the student's cost together over candidate students "
                             "(the options below; as studies/pareto.py) and register the front")
    pareto.add_options(parser)
    args = parser.parse_args()
    if args.pareto:
        return pareto.run_script(args, name="search_pareto")
    with user_errors():
        plain = spec_from_args(args, name="search", variants=[])
        defaults = recipe_of(plain)
        teacher, student = models_of(plain, defaults)
        lr = plain.overrides.get("lr") or defaults["student_recipe"]["lr"]
        recipe = _lr_range(args, lr)
        space = MethodSpace(tuple(args.methods), tuple(candidate_link_sets(common_links(teacher, student))),
                            fsp_pairs=args.fsp_pairs if "fsp" in args.methods else "", recipe=recipe,
                            fixed=plain.overrides)  # what --set fixes is not searched
    budget = dict(num_samples=args.num_samples, time_budget_s=args.time_budget_s, grace_period=args.grace_period,
                  reduction_factor=args.reduction_factor, seed=args.searcher_seed)
    known_good = [{**p, **({"lr": lr} if recipe else {})}
                  for p in KNOWN_GOOD if p["method"] in args.methods]
    search = Search(suggest=space, points_to_evaluate=known_good, **budget)
    baseline = Search(suggest=MethodSpace(("none",), recipe=recipe), **budget)
    spec = spec_from_args(args, name="search", variants=[], search=search, baseline_search=baseline,
                          warm_start=args.warm_start,
                          label_header="configuration",
                          title=f"Search result re-run over {args.seeds} seed(s), {args.dataset}")
    return finish(run_study, spec)


def _lr_range(args, lr: float) -> dict:
    if args.search_lr == "none":
        return {}
    if args.search_lr:
        try:
            low, high = (float(v) for v in args.search_lr.split(","))
        except ValueError:
            print(f"kdtune: error: --search-lr {args.search_lr!r}: expected LOW,HIGH, e.g. 0.003,0.03",
                  file=sys.stderr)
            raise SystemExit(2) from None
        return {"lr": (low, high)}
    return {"lr": (lr / 3, lr * 3)}


if __name__ == "__main__":
    raise SystemExit(main())
