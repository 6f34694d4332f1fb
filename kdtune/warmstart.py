"""Warm starts: a search begins with the best configurations earlier studies found for the same dataset, teacher
and student under the same recipe, read back from MLflow (`--warm-start N` on studies/search.py;
`StudySpec.warm_start`).

    earlier study runs (tag kdtune.role=study) whose params dataset, student and train_samples and whose tag
    kdtune.train_set (the training samples' fingerprint, where both studies record it) match this study's
      -> their student runs that ran to their last epoch (FINISHED, not stopped by ASHA), each configuration
         being what the trial set on top of its study's base (tag kdtune.overrides), with the full config it ran
         (its params)
      -> one candidate per (study, configuration): its mean validation accuracy over the seeds it ran (selection
         on validation, never test), best first; the same configuration from several studies counts once
      -> the first N that fit this search's space, were distilled from this study's very teacher and ran this
         study's recipe (`RECIPE_IGNORED`) become Optuna's points_to_evaluate, ahead of the script's own

The teacher is matched on its identity, not on its source text: tag kdtune.teacher_weights, the fingerprint of
the weights the study distilled from (kdtune/teachers.py weights_fingerprint), beside kdtune.teacher_version (the
registered version an alias such as @champion resolved to). `models:/...@champion` read after the alias moved
to a retrained teacher is another teacher, and its studies' points are skipped with that reason; a study
recorded before kdtune fingerprinted teachers cannot be matched for a distilled configuration.

A baseline configuration (method none) does not depend on the teacher: for it the teacher need not match, so the
baseline's own search is warm-started from earlier tuned baselines the same way (the comparison stays fair).

Why the fit check: with a define-by-run space, Ray's OptunaSearch enqueues each point in Optuna
(`study.enqueue_trial`), and a trial then takes the point's value for each parameter the space asks for; a value
the space does not ask for (a beta in a kd point) is silently dropped, one it asks for but the point lacks is
sampled, and one out of range is used with a warning. So a point is taken only if the space asks for exactly
its parameters with values in range (a value within 2 % of a bound is put on the bound, and the line says so);
any other point is skipped with its reason. The points taken are printed with their source study and runs and
recorded on the study's parent run (tag kdtune.warm_start, and results/warm_start.json).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from kdtune.errors import ConfigError
from kdtune.tags import (OVERRIDES_TAG, PARENT_TAG, ROLE_STUDENT, ROLE_STUDY, ROLE_TAG, STOPPED_TAG, TEACHER_TAG,
                         TEACHER_VERSION_TAG, TEACHER_WEIGHTS_TAG, TRAIN_SET_TAG, WARM_TAG)

TOLERANCE = 0.02  # relative: a recorded value this close outside a range is moved onto its bound
SHOWN_SKIPS = 10

# A recorded point carries over only if it ran the recipe this search would run it with: every value of the
# trial's config outside the point itself is compared with the config this search builds for the point (its
# base, its space's constants), so epochs, batch_size and the optimiser with its lr schedule, momentum, betas
# and weight_decay (how far and how a student trains: a best lr at 2 epochs is not one at 30), val_fraction
# (which samples validation accuracy, the ranking, is measured on), augment, precision (bf16 changes every
# step's arithmetic), link_spatial, hard_weight and every method parameter the point does not set (soft_scale,
# hint_loss, adv_loss, logit_standardize, stage1_epochs, ...: they change what the loss is), and the dataset and
# student names. Values that change how a trial runs but not what it computes are not compared:
RECIPE_IGNORED = {
    "seed",  # a candidate is the mean over the seeds it ran; the search runs its own
    "teacher",  # the teacher is matched by its weights' fingerprint (not its name); a baseline has none
    "teacher_cache",  # cached logits are the teacher's own outputs on the same un-augmented samples
    "batched",  # a vmap-batched fused step performs the members' own updates
    "deterministic",  # picks among equivalent kernels (cuDNN), not what is computed
}


@dataclass
class Candidate:
    point: dict
    study: str  # experiment (study) name
    study_run: str  # the earlier study's parent run id
    trial_run: str  # its best run of this configuration (by validation accuracy)
    val_acc: float  # mean over the seeds it ran
    seeds: int
    note: str = ""
    recipe: dict | None = None  # the full config its best run ran (that run's params, as MLflow holds them)
    refusal: str = ""  # why it must not seed this study although it may fit the space (another teacher)

    def describe(self) -> str:
        from kdtune.trial import describe

        return describe(self.point)

    def record(self, phase: str) -> dict:
        return {"phase": phase, "point": self.point, "study": self.study, "study_run": self.study_run,
                "trial_run": self.trial_run, "val_acc": round(self.val_acc, 6), "seeds": self.seeds,
                **({"note": self.note} if self.note else {})}


def candidates(client, identity: dict, exclude_run: str | None = None) -> list[Candidate]:
    """Every earlier configuration of a matching study, best mean validation accuracy first (one per config)."""
    from kdtune.records import OBJECTIVE

    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    studies = _all(client, experiments, f"tags.`{ROLE_TAG}` = '{ROLE_STUDY}'")
    found: dict[str, Candidate] = {}
    for study in studies:
        if study.info.run_id == exclude_run:
            continue
        params, tags = study.data.params, study.data.tags
        if any(params.get(k) != str(identity[k]) for k in ("dataset", "student", "train_samples")):
            continue
        if tags.get(TRAIN_SET_TAG) and identity.get("train_set") and tags[TRAIN_SET_TAG] != identity["train_set"]:
            continue  # other samples under the same dataset name
        other_teacher = _other_teacher(params, tags, identity)
        runs = _all(client, [study.info.experiment_id],
                    f"tags.`{PARENT_TAG}` = '{study.info.run_id}' and tags.`{ROLE_TAG}` = '{ROLE_STUDENT}' "
                    "and attributes.status = 'FINISHED'")
        per_config: dict[str, list] = {}
        for run in runs:
            metrics = run.data.metrics
            if (STOPPED_TAG in run.data.tags or OBJECTIVE.metric not in metrics
                    or metrics.get("epoch") != metrics.get("epochs_total")):
                continue  # stopped by ASHA, or not at its last epoch: not a finished configuration
            try:
                point = json.loads(run.data.tags.get(OVERRIDES_TAG, ""))
            except ValueError:
                continue
            if not isinstance(point, dict) or "method" not in point:
                continue
            per_config.setdefault(json.dumps(point, sort_keys=True), []).append(run)
        name = client.get_experiment(study.info.experiment_id).name if per_config else ""
        for key, group in per_config.items():
            values = [r.data.metrics[OBJECTIVE.metric] for r in group]
            best = OBJECTIVE.best(group, lambda r: r.data.metrics[OBJECTIVE.metric])
            point = json.loads(key)
            # distilled from another teacher: its best settings need not carry over (a baseline has no teacher)
            refusal = other_teacher if point["method"] != "none" else ""
            candidate = Candidate(point, name, study.info.run_id, best.info.run_id, sum(values) / len(values),
                                  len(values), recipe=dict(best.data.params), refusal=refusal)
            held = found.get(key)  # one per configuration: a usable one first, then the best validation accuracy
            if (held is None or (held.refusal and not refusal)
                    or bool(held.refusal) == bool(refusal) and OBJECTIVE.better(candidate.val_acc, held.val_acc)):
                found[key] = candidate
    ranked = sorted(found.values(), key=lambda c: c.val_acc, reverse=OBJECTIVE.mode == "max")
    return ranked


def _other_teacher(params: dict, tags: dict, identity: dict) -> str:
    """Why an earlier study's teacher is not this study's ("" when it is the same weights)."""
    recorded, ours = tags.get(TEACHER_WEIGHTS_TAG), identity.get("teacher_weights")
    if params.get("teacher") == identity["teacher"] and recorded and recorded == ours:
        return ""
    this = _teacher_text(identity.get("teacher_source"), identity.get("teacher_version"), ours)
    if not recorded:
        return (f"its study records no teacher fingerprint (run before kdtune recorded one), so it cannot be shown "
                f"to have distilled from this study's teacher ({this})")
    that = _teacher_text(tags.get(TEACHER_TAG), tags.get(TEACHER_VERSION_TAG), recorded)
    return f"distilled from another teacher ({that}; this study's: {this})"


def _teacher_text(source, version, weights) -> str:
    """e.g. "models:/kdtune-teacher-digits-digits_teacher@champion = version 2, weights sha1:..."."""
    where = f" = version {version.rsplit('/', 1)[-1]}" if version and " + " not in version else (
        f" = versions {version}" if version else "")
    return f"{source or 'no teacher'}{where}, weights {weights or 'not fingerprinted'}"


def _all(client, experiments: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiments, filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


class _Missing(Exception):
    pass


class _Refused(Exception):
    pass


class _Probe:
    """Stands in for an Optuna trial: answers the space's suggest_* calls from a recorded point, noting what the
    space asked for and any value it does not allow."""

    def __init__(self, point: dict):
        self.point = dict(point)
        self.asked: dict = {}
        self.problems: list[str] = []
        self.moved: list[str] = []

    def _value(self, name):
        if name not in self.point:
            raise _Missing(name)
        return self.point[name]

    def suggest_categorical(self, name, choices):
        value = self._value(name)
        if value not in list(choices):  # the rest of a define-by-run space depends on this choice: stop here
            raise _Refused(f"{name}={value!r} is not among {list(choices)}")
        self.asked[name] = value
        return value

    def suggest_float(self, name, low, high, *, step=None, log=False):
        value = self._value(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problems.append(f"{name}={value!r} is not a number")
        else:
            value = float(value)
            if not low <= value <= high:
                bound = low if value < low else high
                if abs(value - bound) <= TOLERANCE * abs(bound):
                    self.moved.append(f"{name} {value:g} -> {bound:g} (the range's bound)")
                    value = bound
                else:
                    self.problems.append(f"{name}={value:g} is outside this search's range [{low:g}, {high:g}]")
        self.asked[name] = value
        return value

    def suggest_int(self, name, low, high, *, step=1, log=False):
        value = self._value(name)
        if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float)
                                                                          and value.is_integer()):
            self.problems.append(f"{name}={value!r} is not a whole number")
        elif not low <= int(value) <= high:
            self.problems.append(f"{name}={value} is outside this search's range [{low}, {high}]")
        else:
            value = int(value)
        self.asked[name] = value
        return value


def fit(space, point: dict, base: dict, recorded: dict | None = None) -> tuple[dict | None, str]:
    """(the point as this search would run it, "") or (None, why it does not fit the search's space, or, given
    `recorded` (the config the point ran, as MLflow params), why its recipe is not the one this search runs)."""
    from kdtune.distill.registry import trial_config

    probe = _Probe(point)
    try:
        constants = space(probe) or {}
    except _Missing as missing:
        return None, f"this search samples {missing.args[0]}, which the recorded point does not set"
    except _Refused as refused:
        return None, str(refused)
    except Exception as error:  # a space that cannot take this point at all
        return None, f"the search's space refuses it ({type(error).__name__}: {error})"
    if probe.problems:
        return None, "; ".join(probe.problems)
    extra = sorted(set(point) - set(probe.asked) - set(constants))
    if extra:
        return None, (f"it sets {', '.join(f'{k}={point[k]!r}' for k in extra)}, which this search does not "
                      "sample (the trial would silently drop it)")
    differing = sorted(k for k in constants if k in point and point[k] != constants[k])
    if differing:
        return None, ", ".join(f"{k}={point[k]!r} differs from this search's {constants[k]!r}" for k in differing)
    taken = dict(probe.asked)
    try:
        config = trial_config({**taken, **constants}, base)
    except ConfigError as error:
        return None, str(error)
    if recorded is not None:
        try:  # as recorded (a value moved onto a bound would move what derives from it, e.g. hard_weight)
            config = trial_config({**point, **constants}, base)
        except ConfigError:
            pass
        differing = recipe_differences(config.to_flat(), recorded, point)
        if differing:
            return None, f"it ran another recipe: {'; '.join(differing)}"
    return taken, "; ".join(probe.moved)


def recipe_differences(flat: dict, recorded: dict, point: dict) -> list[str]:
    """Each value outside the point (and `RECIPE_IGNORED`) where the recorded run's config (MLflow params:
    strings) differs from `flat`, the config this search would run, e.g. "epochs=2 (this search: 3)"."""
    differing = []
    for key, value in flat.items():
        if key in RECIPE_IGNORED or key in point:
            continue
        if key not in recorded:
            differing.append(f"{key} not recorded (this search: {value})")
        elif recorded[key] != str(value):
            differing.append(f"{key}={recorded[key]} (this search: {value})")
    return differing


def pick(ranked: list[Candidate], space, base: dict, limit: int) -> tuple[list[Candidate], list[tuple]]:
    """The first `limit` candidates that fit (each with the point as it will run), and the better-ranked ones
    skipped on the way, with their reasons."""
    taken, skipped = [], []
    for candidate in ranked:
        if len(taken) >= limit:
            break
        point, why = fit(space, candidate.point, base)
        if point is not None and candidate.refusal:
            point, why = None, candidate.refusal
        if point is not None and candidate.recipe is not None:
            point, why = fit(space, candidate.point, base, candidate.recipe)
        if point is None:
            if not why.startswith("method="):  # a method this search does not run: not a candidate for it at all
                skipped.append((candidate, why))
            continue
        taken.append(dataclasses.replace(candidate, point=point, note=why))
    return taken, skipped


def warm_start(spec, client, parent_run_id: str, identity: dict, base: dict, echo=print) -> dict:
    """Put the recorded best points first in the study's search (and baseline search); print and record where
    each came from. Returns {phase: [Candidate, ...]}."""
    limit = int(spec.warm_start or 0)
    if limit < 1 or spec.search is None:
        return {}
    ranked = candidates(client, identity, exclude_run=parent_run_id)
    chosen, records = {}, []
    for phase, attribute in (("search", "search"), ("baseline_search", "baseline_search")):
        search = getattr(spec, attribute)
        if search is None:
            continue
        taken, skipped = pick(ranked, search.suggest, base, limit)
        chosen[phase] = taken
        points = [c.point for c in taken]
        own = [p for p in search.points_to_evaluate if p not in points]
        setattr(spec, attribute, dataclasses.replace(search, points_to_evaluate=points + own))
        if not taken:
            echo(f"warm start ({phase}): no finished configuration of an earlier study with this dataset, teacher "
                 f"and student fits this search and its recipe"
                 + (f" ({len(skipped)} skipped, below)" if skipped else ""))
        else:
            echo(f"warm start ({phase}): {len(taken)} recorded point(s) run first, best validation accuracy first:")
        for candidate in taken:
            records.append(candidate.record(phase))
            echo(f"  {candidate.describe():<40} val {100 * candidate.val_acc:.2f}% (mean of {candidate.seeds} "
                 f"seed(s)) from study {candidate.study} run {candidate.study_run}, trial run {candidate.trial_run}"
                 + (f"; {candidate.note}" if candidate.note else ""))
        for candidate, why in skipped[:SHOWN_SKIPS]:
            echo(f"  skipped {candidate.describe()} (val {100 * candidate.val_acc:.2f}%, study {candidate.study} "
                 f"run {candidate.study_run}): {why}")
        if len(skipped) > SHOWN_SKIPS:
            echo(f"  ... and {len(skipped) - SHOWN_SKIPS} more skipped (not fitting this search)")
    text = json.dumps(records)
    client.set_tag(parent_run_id, WARM_TAG, text if len(text) <= 5000 else
                   json.dumps([{k: r[k] for k in ("phase", "study", "study_run", "trial_run")} for r in records]))
    client.log_text(parent_run_id, json.dumps(records, indent=2), "results/warm_start.json")
    return chosen


def check_warm_start(value, searches: bool = True) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"warm_start={value!r}: give the number of recorded points to start from (>= 1), or 0 "
                          "for none")
    if value and not searches:
        raise ConfigError(f"warm_start={value}: only a search starts from recorded points (a grid runs every "
                          "variant it lists); use studies/search.py, or leave warm_start 0")


def identity_of(study, tags: dict) -> dict:
    """What must match between two studies for one's best points to seed the other's search (beside each
    point's recipe, `fit`): the dataset (name, size, samples' fingerprint), the student, and the teacher's
    weights; `tags` are this study's parent-run tags (the teacher's, once it is obtained)."""
    return {"dataset": study.dataset.name, "teacher": study.teacher_cfg.student, "student": study.base.shared.student,
            "train_samples": study.dataset.num_train, "train_set": tags.get(TRAIN_SET_TAG),
            "teacher_source": tags.get(TEACHER_TAG), "teacher_weights": tags.get(TEACHER_WEIGHTS_TAG),
            "teacher_version": tags.get(TEACHER_VERSION_TAG)}

