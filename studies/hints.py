"""Seed 001 Tables 2 and 4: the student without distillation (Base), with KD, and with KD + hints (KD+HT).

    python studies/hints.py --dataset digits --seeds 2
    python studies/hints.py --dataset cifar10 --seeds 3 --gpus-per-trial 0.25        # cnn11 -> cnn2
    python studies/hints.py --dataset cifar100 --seeds 3 --gpus-per-trial 0.25

KD+HT first trains the student up to its guided layer on the hint loss through a 1x1 adaptation layer
(--hint-epochs), then the whole student with KD (--epochs). Off digits, the pair defaults to seed 001's:
the 11-conv teacher (cnn11) and the 2-block student (cnn2).
"""
from kdtune.options import finish, spec_from_args, study_parser
from kdtune.results import BASELINE_LABEL
from kdtune.study import run_study


def main() -> int:
    parser = study_parser(__doc__.splitlines()[0])
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--hint-links", default="2", help="hint (teacher) / guided (student) link number(s)")
    parser.add_argument("--hint-weight", type=float, default=1.0, help="beta: weight of the hint loss")
    parser.add_argument("--hint-epochs", type=int, default=5, help="epochs of the hint stage")
    args = parser.parse_args()
    if args.dataset != "digits":
        args.teacher = args.teacher or "cnn11"
        args.student = args.student or "cnn2"
    kd = {"temperature": args.temperature, "alpha": args.alpha}
    variants = [
        {"label": BASELINE_LABEL, "method": "none"},
        {"label": "KD", "method": "kd", **kd},
        {"label": "KD+HT", "method": "hints", "links": args.hint_links, "beta": args.hint_weight,
         "stage1_epochs": args.hint_epochs, **kd},
    ]
    spec = spec_from_args(args, name="hints", variants=variants, label_header="student",
                          title=f"Base / KD / KD+HT (seed 001 Tables 2/4), {args.dataset}, T={args.temperature:g}, "
                                f"alpha={args.alpha:g}, hint link(s) {args.hint_links}")
    return finish(run_study, spec)


if __name__ == "__main__":
    raise SystemExit(main())
