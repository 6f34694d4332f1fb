"""Pareto search: distilled students over architectures, validation accuracy against latency (or params, FLOPs).

    python studies/pareto.py --dataset digits
    python studies/pareto.py --dataset digits --latency-budget-ms 0.05
    python studies/pareto.py --dataset cifar10 --family wrn --knob depth=10,16,22 --knob widen=1,2,4 \\
        --num-samples 60 --gpus-per-trial 0.25 --seeds 3
    python studies/pareto.py --dataset cifar10 --students vgg:width=0.25 vgg:width=0.5 torchvision:mobilenet_v3_small

Every candidate student (a family's sizes, default: width multipliers around the dataset's student, or the
references given) is measured once, one at a time, before anything trains: parameters and FLOPs, and latency
at batch 1 and per image in a batch on the device a trial uses (warm-up, median of repeats). Optuna's
multi-objective search (validation accuracy up, the cost down) then chooses the student and the method's
settings; the same search without distillation tunes each architecture's baseline. The front (non-dominated on
validation) is re-run with its no-distillation students over --seeds seeds, reported on test, drawn in the
report, and registered: one version per member with its costs as tags. With --latency-budget-ms or
--max-params the most accurate member within the budget (on validation) goes through the gate for @champion.
"""
from kdtune.pareto import script as pareto
from kdtune.options import study_parser


def main() -> int:
    parser = study_parser(__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["kd"],
                        help="distillation methods searched (methods with links use the link numbers every "
                             "candidate shares with the teacher)")
    parser.add_argument("--num-samples", type=int, default=12, help="trials of each search (distilled, baseline)")
    parser.add_argument("--time-budget-s", type=float, help="stop proposing trials after this many seconds")
    parser.add_argument("--grace-period", type=int, default=2, help="with --asha: epochs before a trial can stop")
    parser.add_argument("--reduction-factor", type=int, default=3, help="with --asha: keep 1/N trials per rung")
    parser.add_argument("--searcher-seed", type=int, default=0)
    parser.add_argument("--search-lr", metavar="LOW,HIGH",
                        help="learning-rate range searched (log scale); default 1/3x to 3x the recipe's; 'none'")
    pareto.add_options(parser)
    return pareto.run_script(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
