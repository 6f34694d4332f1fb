"""Seed 001 section 3.2: multi-step distillation, teacher -> assistant -> student, against direct KD.

    python studies/teacher_assistant.py --dataset digits --seeds 2
    python studies/teacher_assistant.py --dataset cifar10 --assistant <2-block CNN> --student <1-block CNN>

Three studies on one MLflow server and one Ray: (1) the assistant distilled from the teacher and registered
(its own runs; the version it registers, not whichever is @champion, becomes the next teacher), (2) the student's baseline and direct KD from the
teacher, (3) the student distilled from the assistant. Each step has its own T and alpha.
"""
from kdtune.distill import method_class
from kdtune.errors import KdtuneError
from kdtune.options import finish, shared_tracking, spec_from_args, study_parser, user_errors
from kdtune.results import format_table, summarise
from kdtune.tags import BASELINE_LABEL
from kdtune.study import run_study

DIGITS_CHAIN = {"assistant": "digits_assistant", "student": "digits_student"}


def _declared(values: dict, declared: set) -> dict:
    return {k: v for k, v in values.items() if k in declared}


def main() -> int:
    parser = study_parser(__doc__.splitlines()[0])
    parser.add_argument("--assistant", help="assistant architecture (digits: digits_assistant)")
    parser.add_argument("--method", default="kd", help="distillation method of every step")
    parser.add_argument("--assistant-temperature", type=float, default=4.0)
    parser.add_argument("--assistant-alpha", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=4.0, help="T of the student's step (both routes)")
    parser.add_argument("--alpha", type=float, default=0.9, help="alpha of the student's step (both routes)")
    args = parser.parse_args()
    assistant = args.assistant or (DIGITS_CHAIN["assistant"] if args.dataset == "digits" else None)
    args.student = args.student or (DIGITS_CHAIN["student"] if args.dataset == "digits" else None)
    if not assistant or not args.student:
        parser.error("--assistant and --student are required for datasets other than digits")
    with user_errors():  # T and alpha apply where the method declares them (kdtune methods show NAME)
        declared = {p.name for p in method_class(args.method).params}
    step = {"method": args.method, **_declared({"temperature": args.temperature, "alpha": args.alpha}, declared)}
    assistant_step = {"method": args.method, **_declared({"temperature": args.assistant_temperature,
                                                          "alpha": args.assistant_alpha}, declared)}

    with shared_tracking(args):
        assistant_args = dict(vars(args), student=assistant)
        assistant_spec = spec_from_args(
            _namespace(assistant_args), name="teacher_assistant.assistant", label_header="assistant",
            variants=[{"label": "assistant", **assistant_step}],
            register_as=f"kdtune-{args.dataset}-{assistant}-assistant")
        spec_direct = spec_from_args(args, name="teacher_assistant.direct", label_header="student",
                                     variants=[{"label": BASELINE_LABEL, "method": "none"},
                                               {"label": "direct KD", **step}])
        results = {}

        def chain(_spec):
            results["assistant"] = run_study(assistant_spec)
            registered = results["assistant"].registration
            if registered is None:
                raise KdtuneError("the assistant study registered no assistant (every trial failed); see above")
            results["direct"] = run_study(spec_direct)
            # the version this study just trained, not @champion: an earlier study's champion would let another
            # run (and whichever test set chose it) steer this chain
            via = spec_from_args(args, name="teacher_assistant.chain", label_header="student",
                                 variants=[{"label": "via assistant", **step}],
                                 teacher=assistant, teacher_source=f"models:/{registered.name}/{registered.version}",
                                 register_as=f"kdtune-{args.dataset}-{args.student}-via-assistant")
            results["chain"] = run_study(via)
            return results["chain"]

        def rows(_result):  # the student's rows from both routes, side by side
            return summarise(results["direct"].trials + results["chain"].trials,
                             order=[BASELINE_LABEL, "direct KD", "via assistant"])

        def table(result):
            ta = results["assistant"].summary[0]
            return (f"teacher {results['direct'].teacher} -> assistant {assistant}: assistant test acc "
                    f"{100 * ta.test_mean:.2f}% ({ta.n} seed(s))\n" + format_table(rows(result), "student"))

        return finish(chain, spec_direct, table=table, summary=rows)


def _namespace(values: dict):
    import argparse

    return argparse.Namespace(**values)


if __name__ == "__main__":
    raise SystemExit(main())
