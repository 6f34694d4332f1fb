"""What kind of study the driver runs, as one small interface: kdtune/study.py has no branch per kind.

    kind = kind_of(spec, resolved, echo)     once, before any run or folder exists

A kind answers, in the driver (kdtune/study.py calls these and nothing else kind-specific):
    trainable(parts, resolved)          the Tune function a trial runs and the parts it is given
    searcher(search) / scheduler(asha)  the searcher of a search phase, and the scheduler (ASHA, or None)
    confirm_variants(phases, chosen)    the confirm phase's variants, given the best point of each search and
                                        the tuned baseline (`chosen`)
    finish(context, phases, final, summary, parent_id) -> (best label, registry decision)
                                        what is registered and which version becomes champion
    result_lines(result, failures)      the results table logged to the study run (results/table.txt)

Kinds: kdtune/best_setting.py (grid and search studies, the methods study's labelled searches included: the best
setting against its baseline, the best student registered) and kdtune/pareto/run.py (the accuracy/cost front of
a Pareto study, every member registered). A new kind is a new file with these methods.
"""
from __future__ import annotations


def kind_of(spec, resolved, echo=print):
    """The kind that runs `spec`: a Pareto study's when it has a plan (its candidates' costs are measured now),
    else the best-setting kind."""
    from kdtune.best_setting import BestSetting
    from kdtune.pareto.run import ParetoRun

    return ParetoRun.measure(spec, resolved, echo) if spec.pareto is not None else BestSetting()
