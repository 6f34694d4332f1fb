"""Seed 000 Table 3: soft-target-only transfer at each temperature, next to the baseline student.

Fair by default: every row, the baseline included, is trained at three learning rates (1/3x, 1x and 3x the
recipe's; --tune to choose others, --tune none for the recipe's alone) and reported at its own best one,
chosen on validation. The line under the table says whether distillation beats that tuned baseline.

    python studies/temperature_sweep.py --dataset digits            # the embedded default, minutes on a laptop
    python studies/temperature_sweep.py --dataset cifar10 --address auto --gpus-per-trial 0.25 --seeds 3 \\
        --tracking-uri http://head:5000 --storage /shared/ray_results
"""
from kdtune.options import finish, spec_from_args, study_parser, user_errors
from kdtune.tags import BASELINE_LABEL
from kdtune.study import run_study

TEMPERATURES = [0.6, 1, 1.5, 2, 2.5, 3, 5, 10, 40]


def main() -> int:
    parser = study_parser(__doc__.splitlines()[0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=TEMPERATURES)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the soft term (hard: 1 - alpha)")
    args = parser.parse_args()
    if args.tune is None:
        from kdtune.resolve import recipe_of

        with user_errors():
            lr = args.lr or recipe_of(spec_from_args(args, name="temperature_sweep", variants=[]))["student_recipe"]["lr"]
        args.tune = ["lr=" + ",".join(f"{lr * f:.3g}" for f in (1 / 3, 1, 3))]
    variants = [{"label": BASELINE_LABEL, "method": "none"}] + [
        {"label": f"{t:g}", "method": "kd", "temperature": t, "alpha": args.alpha} for t in args.temperatures
    ]
    spec = spec_from_args(args, name="temperature_sweep", variants=variants, label_header="T",
                          title=f"Temperature sweep (seed 000 Table 3), {args.dataset}, alpha={args.alpha}")
    return finish(run_study, spec)


if __name__ == "__main__":
    raise SystemExit(main())
