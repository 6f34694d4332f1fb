"""Seed 001 Tables 2 and 4: the student without distillation (Base), with KD, and with KD + hints (KD+HT).

    python studies/hints.py --dataset digits --seeds 2
    python studies/hints.py --dataset cifar10 --seeds 3 --gpus-per-trial 0.25        # cnn11 -> cnn2
    python studies/hints.py --dataset cifar100 --seeds 3 --gpus-per-trial 0.25

KD+HT first trains the student up to its guided layer on the hint loss through a 1x1 adaptation layer
(--hint-epochs), then the whole student with KD (--epochs). Off digits, the pair defaults to seed 001's:
the 11-conv teacher (cnn11) and the 2-block student (cnn2).

Forms: the KD rows' soft term runs in seed 001's own form by default, KL without T^2 ((1-a)*H(y,P_S) +
a*H(P_T^T,P_S^T)); --soft-scale T2 runs Hinton's T^2 * KL. The hint loss is the mean squared error by default
(--hint-loss mean, so beta means the same for any feature size); --hint-loss sum is FitNets' 1/2 * ||u - r(v)||^2
summed per sample (seed 001 eq. 2.4 writes the squared norm, the same up to a factor 2 in beta).
"""
from kdtune.config import HINT_LOSSES, SOFT_SCALE_TEXT, SOFT_SCALES
from kdtune.options import finish, spec_from_args, study_parser
from kdtune.tags import BASELINE_LABEL
from kdtune.study import run_study


def main() -> int:
    parser = study_parser(__doc__.splitlines()[0])
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--hint-links", default="2", help="hint (teacher) / guided (student) link number(s)")
    parser.add_argument("--hint-weight", type=float, default=1.0, help="beta: weight of the hint loss")
    parser.add_argument("--hint-epochs", type=int, default=5, help="epochs of the hint stage")
    parser.add_argument("--soft-scale", choices=SOFT_SCALES, default="none",
                        help="soft term: 'none' = KL without T^2, seed 001's form (default); 'T2' = Hinton's T^2 * KL")
    parser.add_argument("--hint-loss", choices=HINT_LOSSES, default="mean",
                        help="hint loss: 'mean' = MSE (default); 'sum' = FitNets' 1/2 * squared L2 norm per sample")
    args = parser.parse_args()
    if args.dataset != "digits":
        args.teacher = args.teacher or "cnn11"
        args.student = args.student or "cnn2"
    kd = {"temperature": args.temperature, "alpha": args.alpha, "soft_scale": args.soft_scale}
    variants = [
        {"label": BASELINE_LABEL, "method": "none"},
        {"label": "KD", "method": "kd", **kd},
        {"label": "KD+HT", "method": "hints", "links": args.hint_links, "beta": args.hint_weight,
         "stage1_epochs": args.hint_epochs, "hint_loss": args.hint_loss, **kd},
    ]
    spec = spec_from_args(args, name="hints", variants=variants, label_header="student",
                          title=f"Base / KD / KD+HT (seed 001 Tables 2/4), {args.dataset}, T={args.temperature:g}, "
                                f"alpha={args.alpha:g}, {SOFT_SCALE_TEXT[args.soft_scale]}, hint link(s) "
                                f"{args.hint_links}, hint loss {args.hint_loss}")
    return finish(run_study, spec)


if __name__ == "__main__":
    raise SystemExit(main())
