"""Seed 001 Tables 1 and 3: KD over alpha in {0.3, 0.5, 0.7, 0.9} x T in {2, 4, ..., 14}.

    python studies/alpha_temperature.py --dataset digits --seeds 2
    python studies/alpha_temperature.py --dataset cifar10 --seeds 3 --gpus-per-trial 0.25

Loss: (1 - alpha) * H(y, P_S) + alpha * S * KL(P_T^T || P_S^T); the table is test accuracy per (T, alpha) with
row and column means, as in the paper.
The soft term runs in seed 001's own form by default, without T^2 (S = 1: its (1-a)*H(y,P_S) + a*H(P_T^T,P_S^T);
KL and that cross-entropy differ by a constant); --soft-scale T2 runs Hinton's T^2 * KL instead. Under S = 1 the
soft term's gradient shrinks as 1/T^2, so at large T the students train mostly on the hard term.
"""
from kdtune.config import SOFT_SCALE_TEXT, SOFT_SCALES
from kdtune.options import finish, spec_from_args, study_parser
from kdtune.results import format_matrix
from kdtune.tags import BASELINE_LABEL
from kdtune.study import run_study

ALPHAS = [0.3, 0.5, 0.7, 0.9]
TEMPERATURES = [2, 4, 6, 8, 10, 12, 14]


def main() -> int:
    parser = study_parser(__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
    parser.add_argument("--temperatures", type=float, nargs="+", default=TEMPERATURES)
    parser.add_argument("--soft-scale", choices=SOFT_SCALES, default="none",
                        help="soft term: 'none' = KL without T^2, seed 001's form (default); 'T2' = Hinton's T^2 * KL")
    args = parser.parse_args()
    variants = [{"label": BASELINE_LABEL, "method": "none"}] + [
        {"label": f"T={t:g} a={a:g}", "method": "kd", "temperature": float(t), "alpha": float(a),
         "soft_scale": args.soft_scale}
        for t in args.temperatures for a in args.alphas
    ]
    spec = spec_from_args(args, name="alpha_temperature", variants=variants, label_header="T, alpha",
                          title=f"Test accuracy (%) for alpha x T (seed 001 Tables 1/3), {args.dataset}, "
                                f"{SOFT_SCALE_TEXT[args.soft_scale]}")
    return finish(run_study, spec, table=lambda result: format_matrix(result.summary, "temperature", "alpha", "T", "a"))


if __name__ == "__main__":
    raise SystemExit(main())
