"""Seed 001 Tables 1 and 3: KD over alpha in {0.3, 0.5, 0.7, 0.9} x T in {2, 4, ..., 14}.

    python studies/alpha_temperature.py --dataset digits --seeds 2
    python studies/alpha_temperature.py --dataset cifar10 --seeds 3 --gpus-per-trial 0.25

Loss: (1 - alpha) * H(y, P_S) + alpha * T^2 * KL(P_T^T || P_S^T); the table is test accuracy per (T, alpha) with
row and column means, as in the paper.
"""
from kdtune.options import finish, spec_from_args, study_parser
from kdtune.results import BASELINE_LABEL, format_matrix
from kdtune.study import run_study

ALPHAS = [0.3, 0.5, 0.7, 0.9]
TEMPERATURES = [2, 4, 6, 8, 10, 12, 14]


def main() -> int:
    parser = study_parser(__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
    parser.add_argument("--temperatures", type=float, nargs="+", default=TEMPERATURES)
    args = parser.parse_args()
    variants = [{"label": BASELINE_LABEL, "method": "none"}] + [
        {"label": f"T={t:g} a={a:g}", "method": "kd", "temperature": float(t), "alpha": float(a)}
        for t in args.temperatures for a in args.alphas
    ]
    spec = spec_from_args(args, name="alpha_temperature", variants=variants, label_header="T, alpha",
                          title=f"Test accuracy (%) for alpha x T (seed 001 Tables 1/3), {args.dataset}")
    return finish(run_study, spec, table=lambda result: format_matrix(result.summary, "temperature", "alpha", "T", "a"))


if __name__ == "__main__":
    raise SystemExit(main())
