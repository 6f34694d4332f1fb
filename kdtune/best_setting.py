"""The best-setting study kind (kdtune/study_kind.py): grid studies, search studies and the methods study's
labelled searches. Trials are `distill_trial`s of the study's one student; a search is Optuna TPE with ASHA; the
confirm phase runs the tuned baseline and each search's best point; the best setting on validation is registered
(its best seed), and the registry gate decides whether it becomes champion."""
from __future__ import annotations

from kdtune import cluster, students
from kdtune.records import OBJECTIVE
from kdtune.results import SettingRow
from kdtune.registration import register_trial
from kdtune.study_context import StudyContext
from kdtune.tags import student_model_name


def registered_name(context: StudyContext) -> str:
    return context.spec.register_as or student_model_name(context.dataset.name, context.resolved.student.name)


class BestSetting:
    """The best setting against its baseline; one student registered."""

    def trainable(self, parts, resolved):
        from kdtune.trial import distill_trial

        return distill_trial, parts

    def searcher(self, search):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(space=search.suggest, metric=OBJECTIVE.metric, mode=OBJECTIVE.mode,
                            points_to_evaluate=search.points_to_evaluate or None,
                            sampler=optuna.samplers.TPESampler(seed=search.seed))

    def scheduler(self, asha):
        return asha

    def confirm_variants(self, phases: dict, chosen: list[dict]) -> list[dict]:
        return chosen

    def finish(self, context: StudyContext, phases: dict, final: list, summary: list[SettingRow], parent_id: str):
        from kdtune.results import pick_best

        best_label = pick_best(summary, allow_failed=context.spec.allow_failed_best)
        decision = self._register_best(context, final, summary, best_label) if best_label else None
        return best_label, decision

    def result_lines(self, result, failures: str) -> list[str]:
        from kdtune.results import baseline_tuning, verdict

        search = result.spec.baseline_search
        return [result.table(), verdict(result.summary, baseline_tuning(result.spec.tune, search.num_samples
                                                                        if search else 0)), failures]

    def _register_best(self, context: StudyContext, trials: list, summary: list[SettingRow], best_label: str):
        """Register the best configuration's best seed; the registry gate decides whether it is champion."""
        from kdtune.models import count_parameters

        row = next(r for r in summary if r.label == best_label)
        candidates = [t for t in trials if t.label == best_label and t.point == row.point and t.finished
                      and "weights_uri" in t.metrics]
        best = OBJECTIVE.best_trial(candidates)
        if best is None:
            return None
        student = context.resolved.student.build(context.dataset.num_classes, context.dataset.input_shape)
        model_uri = students.servable_model_uri(context.client, best.run_id, context.resolved.student,
                                                context.dataset)
        decision = register_trial(context, best, row, registered_name(context), model_uri, context.base.shared.student,
                                  {"parameters": count_parameters(student), **self._champion_latency(context)})
        context.echo(f"registry: {decision.name} version {decision.version} -> @{decision.alias} ({decision.reason})")
        return decision

    def _champion_latency(self, context: StudyContext) -> dict[str, str]:
        """The registered student's latency as version tags (kdtune/train/costs.py latency_tags): measured once, here,
        after every trial of the study has ended, alone where a trial runs (the driver for a local CPU study, else
        one Ray task with a trial's CPUs and a whole GPU), the way a Pareto study measures its candidates. Latency
        depends on the architecture, not on the trained weights. A failed measurement costs the version its
        latency tags, not its registration."""
        import math

        from kdtune.train import costs

        spec, dataset, ref = context.spec, context.dataset, context.resolved.student
        try:
            table, seconds = cluster.run_like_a_trial(
                costs.measure_task, {ref.spec: ref}, dataset.num_classes, tuple(dataset.input_shape),
                threads=max(1, int(spec.cpus_per_trial)), cpus=spec.cpus_per_trial,
                gpus=math.ceil(spec.gpus_per_trial))
        except Exception as error:  # a timing must never cost the study its registration
            context.echo(f"latency: not measured ({type(error).__name__}: {str(error).splitlines()[0][:200]}); the "
                      "version is registered without latency tags")
            return {}
        measured = table[ref.spec]
        context.echo(f"latency: {ref.spec} measured alone after the study on {measured['device']} in {seconds:.1f}s: "
                  f"{measured['latency_ms_batch1']:.4f} ms at batch 1, {measured['latency_ms_per_image']:.5f} ms "
                  "per image in a batch of 256")
        return costs.latency_tags(measured)
