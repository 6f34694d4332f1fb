"""Seed 003 Tables 1 and 2 and seed 004 Table 1: adversarial distillation against KD and its ablation.

    python studies/adversarial.py --dataset digits --seeds 3
    python studies/adversarial.py --dataset cifar10 --seeds 5 --gpus-per-trial 0.25    # wrn_40_10 -> wrn_10_4
    python studies/adversarial.py --dataset mnist --seeds 5 --tables 004               # MLPs 2x1200 -> 2x800

Table 1 (seed 003): baseline, KD at T in {1, 2, 5, 10}, and conditional adversarial KD (L_S + L_L1 + L_GAN).
Table 2 (seed 003): the ablation L_S / L_GAN / L_GAN + L_S / L_GAN + L_L1 / all three.
Table 1 (seed 004): KD as hard + lambda * soft against adversarial KD with a pre-trained discriminator, in two
rows: "seed 004 (paper form)", the loss as seed 004 writes it, alpha * CE - beta * L_class, which maximises a
cross-entropy and is unbounded below (it can run away to NaN: such a trial ends as diverged and is counted as
failed), and "seed 004 (non-saturating)", alpha * CE + beta * -log P_D(teacher | a_S), bounded below by 0.
Seed 003 reports the median of 5 runs: run with --seeds 5; the table shows the median beside mean ± std.
Teacher logits are computed once, offline, and shared by every trial where no augmentation is on.

Forms: the KD rows use Hinton's T^2 * KL by default (--soft-scale T2): seed 003 compares against Hinton's KD;
seed 004 writes its lambda * H(P_T^T, P_S^T) without T^2: --soft-scale none runs that form (every KD row).
"""
from kdtune.config import SOFT_SCALE_TEXT, SOFT_SCALES
from kdtune.options import finish, spec_from_args, study_parser
from kdtune.results import format_table
from kdtune.tags import BASELINE_LABEL
from kdtune.study import run_study

ABLATION = [("L_S", 1, 0, 0), ("L_GAN", 0, 0, 1), ("L_GAN + L_S", 1, 0, 1), ("L_GAN + L_L1", 0, 1, 1),
            ("L_S + L_L1 + L_GAN", 1, 1, 1)]


SEED004 = [("seed 004 (paper form)", "paper"), ("seed 004 (non-saturating)", "nonsaturating")]


def variants_for(tables: list[str], kd_temperatures: list[float], lam: float, soft_scale: str = "T2") -> list[dict]:
    variants = [{"label": BASELINE_LABEL, "method": "none"}]
    if "1" in tables:
        variants += [{"label": f"KD T={t:g}", "method": "kd", "temperature": t, "alpha": 0.9,
                      "soft_scale": soft_scale} for t in kd_temperatures]
    if "1" in tables or "2" in tables:
        rows = ABLATION if "2" in tables else ABLATION[-1:]
        variants += [{"label": name, "method": "adversarial", "hard_weight": s, "l1_weight": l1, "adv_weight": gan}
                     for name, s, l1, gan in rows]
    if "004" in tables:
        variants += [{"label": f"KD hard + {lam:g} soft", "method": "kd", "temperature": 4.0, "alpha": lam,
                      "hard_weight": 1.0, "soft_scale": soft_scale}]
        variants += [{"label": label, "method": "adversarial_pretrained", "hard_weight": 1.0, "adv_weight": 0.1,
                      "stage1_epochs": 5, "adv_loss": form} for label, form in SEED004]
    return variants


def main() -> int:
    parser = study_parser(__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=["1", "2", "004"], choices=["1", "2", "004"],
                        help="which tables to run: seed 003's 1 and 2, seed 004's Table 1")
    parser.add_argument("--kd-temperatures", type=float, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--kd-lambda", type=float, default=0.5, help="seed 004: hard + lambda * soft")
    parser.add_argument("--soft-scale", choices=SOFT_SCALES, default="T2",
                        help="KD rows' soft term: 'T2' = Hinton's T^2 * KL (default, seed 003's KD); "
                             "'none' = without T^2 (seed 004's form)")
    args = parser.parse_args()
    if args.dataset in ("cifar10", "cifar100"):
        args.teacher = args.teacher or "wrn_40_10"
        args.student = args.student or "wrn_10_4"
    spec = spec_from_args(args, name="adversarial", variants=variants_for(args.tables, args.kd_temperatures,
                                                                          args.kd_lambda, args.soft_scale),
                          label_header="method", title=f"Adversarial KD (seed 003 Tables {', '.join(args.tables)}; "
                                                       f"seed 004 paper and non-saturating forms), {args.dataset}, "
                                                       f"KD {SOFT_SCALE_TEXT[args.soft_scale]}, "
                                                       f"median of {args.seeds} run(s)")
    return finish(run_study, spec, table=lambda result: format_table(result.summary, "method", show_median=True))


if __name__ == "__main__":
    raise SystemExit(main())
