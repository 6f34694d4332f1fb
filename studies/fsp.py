"""Seed 002 Table 1: FSP-matrix transfer against FitNets hints and plain training, ResNets on CIFAR.

    python studies/fsp.py --dataset digits --seeds 2
    python studies/fsp.py --dataset cifar100 --seeds 3 --gpus-per-trial 0.25         # resnet32 -> resnet8

Rows: the student trained normally for the full budget (Student), for a third of it (Student*), with FitNets
hints then training (FitNet*), and with FSP pre-training (stage 1: sum of ||G_T - G_S||^2 over the section
pairs 1-2, 3-4, 5-6) then training (FSP*): the starred rows train a third of the epochs after their first stage,
as the paper's starred rows use a third of the iterations.

Forms: the FSP loss is seed 002's eq. 2 (one lambda = --fsp-weight for every pair); the second stages are the
main task alone (hard loss, no soft term, as seed 002), so no T^2 question arises; FitNet*'s hint loss is the
mean squared error by default (--hint-loss sum: FitNets' 1/2 * ||u - r(v)||^2 summed per sample). Stage 1 trains
only the layers up to the last linked one; the others keep their BatchNorm statistics (kdtune/train/trainer.py).
"""
from kdtune.config import HINT_LOSSES
from kdtune.options import finish, spec_from_args, study_parser, user_errors
from kdtune.tags import BASELINE_LABEL
from kdtune.study import run_study


def main() -> int:
    parser = study_parser(__doc__.splitlines()[0])
    parser.add_argument("--fsp-pairs", default="1-2,3-4,5-6", help="layer pairs by link number, one per section")
    parser.add_argument("--fsp-weight", type=float, default=0.01,
                        help="beta: the lambda of every FSP pair (at 1.0 the digits ResNets diverged: measured)")
    parser.add_argument("--stage1-epochs", type=int, default=5, help="epochs of the FSP / hint stage")
    parser.add_argument("--hint-links", default="4", help="FitNet: hint / guided link (section 2's output)")
    parser.add_argument("--hint-loss", choices=HINT_LOSSES, default="mean",
                        help="FitNet: 'mean' = MSE (default); 'sum' = FitNets' 1/2 * squared L2 norm per sample")
    args = parser.parse_args()
    args.teacher = args.teacher or "resnet32"
    args.student = args.student or "resnet8"
    if args.epochs is None:
        from kdtune.resolve import recipe_of

        with user_errors():
            args.epochs = recipe_of(spec_from_args(args, name="fsp", variants=[]))["student_recipe"]["epochs"]
    short = max(1, args.epochs // 3)
    main_only = {"alpha": 0.0}  # seed 002's stage 2 is the main task alone: hard loss, no soft term
    variants = [
        {"label": BASELINE_LABEL, "method": "none"},
        {"label": "Student*", "method": "none", "epochs": short},
        {"label": "FitNet*", "method": "hints", "links": args.hint_links, "beta": 1.0, "hint_loss": args.hint_loss,
         "stage1_epochs": args.stage1_epochs, "epochs": short, **main_only},
        {"label": "FSP*", "method": "fsp", "fsp_pairs": args.fsp_pairs, "beta": args.fsp_weight,
         "stage1_epochs": args.stage1_epochs, "epochs": short, **main_only},
    ]
    spec = spec_from_args(args, name="fsp", variants=variants, label_header="student",
                          title=f"FSP (seed 002 Table 1), {args.dataset}, {args.teacher} -> {args.student}; "
                                f"baseline {args.epochs} epochs, starred rows {short} (+{args.stage1_epochs} stage-1), "
                                f"main task without soft term, FitNet hint loss {args.hint_loss}")
    return finish(run_study, spec)


if __name__ == "__main__":
    raise SystemExit(main())
