"""Resolve a study once, in the driver, and check everything it can before anything is created.

    spec (texts or objects)  ->  ResolvedStudy
      dataset      built-in | folder: | npz: | module:function | a Dataset      (kdtune/sources.py)
      references   teacher and student: built-in | torchvision: | timm: | module:factory | objects
                   (kdtune/models/refs.py), each built once and run on a sample batch
      configs      every trial config the study can produce (a search: its space, sampled), validated
      links        each distinct link set probed on the real networks (paths exist, adapters can join)
      augmentation each distinct recipe parsed against the samples' shape
      teacher      its source checked (a file read, pretrained weights found); MLflow sources are read later

A bad value ends here with one ConfigError/DatasetError line: no MLflow run, study folder or registry
version exists yet. Trials later receive these objects and resolve nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kdtune import recipes
from kdtune.config import TrialConfig
from kdtune.distill.registry import StudyBase, trial_config
from kdtune.data import Dataset
from kdtune.errors import ConfigError
from kdtune.scoped import logger_level
from kdtune.sources import resolve_dataset
from kdtune.teachers import TeacherPlan, plan_teacher


@dataclass
class ResolvedStudy:
    dataset: Dataset
    student: object  # ModelRef
    teacher: object  # ModelRef
    base: StudyBase  # the shared values every student trial starts from
    configs: list[TrialConfig]  # every trial config the study can produce
    teacher_config: TrialConfig  # how the teacher is trained (its `student` field is the teacher)
    teacher_plan: TeacherPlan | None  # None: no trial uses a teacher
    user_modules: list[str]  # folders/files of the user's own code to ship to every node
    variants: list[dict]  # the grid: every variant at every tuned point (`tune`), labels kept
    students: dict = field(default_factory=dict)  # a Pareto study's candidate students: spec -> ModelRef
    searches: dict = field(default_factory=dict)  # label -> a labelled Search the pair can run (StudySpec.searches)
    skipped: dict = field(default_factory=dict)  # label -> why the pair cannot run that search's method
    held_out: tuple = ()  # the val_fractions of the trials that use the teacher: it never trains on those splits

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_plan is not None


def resolve_study(spec, echo=print) -> ResolvedStudy:
    from kdtune.models.refs import model_ref, shippable_path

    from kdtune.ensemble import check_methods
    from kdtune.warmstart import check_warm_start

    _check_resources(spec)
    check_warm_start(spec.warm_start, spec.search is not None)
    pareto = getattr(spec, "pareto", None)
    if pareto is not None:
        pareto.check(spec)  # a bad cost, budget or sampler: before the dataset is even loaded
    if spec.search is None and not spec.variants and not spec.searches:
        raise ConfigError(f"study {spec.name!r}: no variants and no search to run")
    labels = [v.get("label") for v in spec.variants]
    if len(set(labels)) != len(labels) or None in labels:
        raise ConfigError(f"study {spec.name!r}: every variant needs a distinct 'label' (got {labels})")
    dataset = _load_dataset(spec)
    recipe = recipes.recipe_for(dataset, builtin=_is_builtin(spec.dataset))
    student = model_ref(spec.student if spec.student is not None else recipe["student"])
    teacher = model_ref(spec.teacher if spec.teacher is not None else recipe["teacher"])
    for ref in (student, teacher):
        ref.check(dataset.num_classes, dataset.input_shape)
    students = {}
    if pareto is not None:  # the candidates a Pareto study's trials choose from, each built and run once
        from kdtune.pareto import check_param_budget

        students = dict(pareto.refs())
        for ref in students.values():
            ref.check(dataset.num_classes, dataset.input_shape, role="student")
        check_param_budget(pareto, students, dataset)
    base = StudyBase({"dataset": dataset.name, "teacher": teacher.spec, "student": student.spec,
                      **recipe["student_recipe"], **spec.overrides})
    variants = expand_tuning(spec.variants, spec.tune)
    configs = [base.trial({**_without_label(v), "seed": seed})
               for v in variants for seed in range(spec.seeds)]
    for search in (spec.search, spec.baseline_search):
        if search is not None:
            configs += _sample_search_space(search, base)
    labelled = {label: _sample_search_space(search, base) for label, search in spec.searches.items()}
    _check_overrides(spec.overrides, configs + [c for sampled in labelled.values() for c in sampled])
    for config in configs + [c for sampled in labelled.values() for c in sampled]:  # one teacher and one student
        if config.teacher != teacher.spec or (config.student != student.spec and config.student not in students):
            raise ConfigError(f"a variant sets teacher={config.teacher!r}, student={config.student!r}; a study has "
                              f"one teacher ({teacher.spec}) and one student ({student.spec}): run one study per pair")
    _check_against_data(configs, dataset, student, teacher, students)
    taught = [c for c in configs + [c for s in labelled.values() for c in s] if _method(c).needs_teacher]
    needs_teacher = bool(taught)
    # the students' validation splits: the teacher never trains on them. By default it trains on exactly the
    # students' training split (at several val_fractions: the smallest one, left by the largest validation split)
    held_out = tuple(sorted({c.val_fraction for c in taught}))
    _warn_small_validation(dataset, {c.val_fraction for c in configs}, echo)
    teacher_config = trial_config({
        "dataset": dataset.name, "teacher": teacher.spec, "student": teacher.spec, "method": "none",
        **recipe["teacher_recipe"], **({"val_fraction": held_out[-1]} if held_out else {}), **spec.teacher_overrides})
    if needs_teacher:
        _check_teacher_split(teacher_config, held_out, dataset, spec.teacher_overrides)
    source = spec.teacher if _is_trained_module(spec.teacher) else spec.teacher_source
    plan = plan_teacher(source, teacher, dataset) if needs_teacher else None
    searches, skipped = {}, {}
    for label, sampled in labelled.items():  # a method the pair cannot run is skipped, with the reason
        reason = _cannot_run(sampled, dataset, student, teacher, plan.members if plan else 1)
        if reason:
            skipped[label] = reason
            echo(f"skipped {label}: {reason}")
        else:
            searches[label] = spec.searches[label]
            configs += sampled
    if labelled and not any(label in searches for label in labelled):
        raise ConfigError("every search was skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    check_methods(configs, plan.members if plan else 1)  # a method that cannot distil from an ensemble
    from kdtune.distill import user_module
    from kdtune.models.refs import shippable_module

    methods = {user_module(c.method) for c in configs}
    modules = sorted({p for p in (shippable_path(student), shippable_path(teacher),
                                  *map(shippable_path, students.values()), *map(shippable_module, methods)) if p})
    return ResolvedStudy(dataset, student, teacher, base, configs, teacher_config, plan, modules, variants, students,
                         searches, skipped, held_out)


def _check_teacher_split(teacher_config: TrialConfig, held_out: tuple, dataset: Dataset, overrides: dict) -> None:
    """A teacher trained here must not train on any sample its students validate on (else those samples steer
    selection on validation through the teacher's soft targets)."""
    from kdtune.teachers import split_refusal

    refusal = split_refusal("the teacher", teacher_config.val_fraction, None, dataset, held_out, to_train=True)
    if refusal:
        given = "the teacher's val_fraction" if "val_fraction" in overrides else "the teacher"
        raise ConfigError(f"{refusal}; leave {given} unset (it then trains on the students' training split) or "
                          f"set the teacher's val_fraction >= {held_out[-1]:g}")


SMALL_VALIDATION = 50  # below this many samples one sample moves validation accuracy by more than 2 points


def _warn_small_validation(dataset: Dataset, fractions: set[float], echo) -> None:
    """Say before the study runs when its validation split is too small to tell settings apart, and what helps."""
    for fraction in sorted(fractions):
        samples = len(dataset.split(fraction)[1])
        if samples >= SMALL_VALIDATION:
            continue
        larger = min(0.5, round(SMALL_VALIDATION / max(dataset.num_train, 1), 2))
        bigger = len(dataset.split(larger)[1]) if larger > fraction else samples
        echo(f"warning: the validation split has {samples} samples (val_fraction {fraction:g} of "
             f"{dataset.num_train}): one sample is {100 / samples:.1f} pt of validation accuracy, so settings will "
             f"often tie on it (ties are broken by the lowest validation loss, and the table says so); "
             + (f"--set val_fraction={larger:g} gives {bigger} samples" if bigger > samples else
                "this dataset is too small for a larger split")
             + ", and more --seeds average out the training noise of each setting")


def _cannot_run(configs: list[TrialConfig], dataset: Dataset, student, teacher, members: int) -> str | None:
    """Why this model pair (and teacher ensemble) cannot run these configs' method, or None when it can."""
    from kdtune.ensemble import ensemble_refusal

    for config in configs:
        reason = ensemble_refusal(config, members)
        if reason:
            return reason
    try:
        _check_against_data(configs, dataset, student, teacher)
    except ConfigError as error:
        return str(error)
    return None


def expand_tuning(variants: list[dict], tune: dict) -> list[dict]:
    """Every variant at every point of the product of the tuned values, e.g. tune={"lr": [0.003, 0.01, 0.03]}:
    the baseline and each distilled setting alike, each later selected on validation at its own best point."""
    import itertools

    if not tune:
        return [dict(v) for v in variants]
    known = TrialConfig.field_names() - {"seed", "dataset", "teacher", "student", "method"}
    for key, values in tune.items():
        if key not in known:
            raise ConfigError(f"tune {key}: not a recipe value to tune; allowed: {', '.join(sorted(known))}")
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"tune {key}={values!r}: give one or more values, e.g. --tune {key}=0.003,0.01,0.03")
        for variant in variants:
            if key in variant:
                raise ConfigError(f"tune {key}: variant {variant['label']!r} sets {key} itself; tune it or set it")
    keys = list(tune)
    expanded = []
    for variant in variants:
        for values in itertools.product(*(tune[k] for k in keys)):
            point = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in zip(keys, values))
            expanded.append({**variant, **dict(zip(keys, values)), "point": point})
    return expanded


def models_of(spec, recipe: dict | None = None) -> tuple[object, object]:
    """(teacher, student) references of a study, for scripts that shape their variants by the models' link
    points; the dataset is loaded only when its recipe must choose a model."""
    from kdtune.models.refs import model_ref

    if spec.teacher is not None and spec.student is not None:
        return model_ref(spec.teacher), model_ref(spec.student)
    recipe = recipe or recipe_of(spec)
    return (model_ref(spec.teacher if spec.teacher is not None else recipe["teacher"]),
            model_ref(spec.student if spec.student is not None else recipe["student"]))


def recipe_of(spec) -> dict:
    """The dataset's recipe (recipes.py); a dataset kdtune does not ship is loaded to apply the rule."""
    if _is_builtin(spec.dataset):
        return recipes.recipe_for(spec.dataset)
    return recipes.recipe_for(_load_dataset(spec, keep=True), builtin=False)


_LOADED: dict = {}  # what recipe_of loaded, kept for the study's own resolve_study (which takes it out)


def _load_dataset(spec, keep: bool = False) -> Dataset:
    """The spec's dataset. `keep`: recipe_of keeps it for the resolve_study that follows, so a script loads
    the data once; resolve_study takes it out again, so nothing stale outlives that pair of calls."""
    if not isinstance(spec.dataset, str):
        return resolve_dataset(spec.dataset, spec.data_dir, spec.download, image_size=spec.image_size,
                               stream=spec.stream)
    key = (spec.dataset, str(spec.data_dir), spec.download, spec.image_size, spec.stream)
    dataset = _LOADED.pop(key, None) or resolve_dataset(spec.dataset, spec.data_dir, spec.download,
                                                         image_size=spec.image_size, stream=spec.stream)
    _LOADED.clear()
    if keep:
        _LOADED[key] = dataset
    return dataset


def common_links(teacher, student) -> list[int]:
    """The numbered links both models declare."""
    return sorted(set(teacher.link_points) & set(student.link_points))


def feature_map_links(spec) -> list[int]:
    """The numbered links both models declare whose features are maps (C x H x W or C x L) in both: what
    attention transfer can link (one probe forward of each network on two samples)."""
    from kdtune.train.linking import plan_links, probe_shapes

    teacher, student = models_of(spec)
    dataset = _load_dataset(spec, keep=True)
    links = [str(k) for k in common_links(teacher, student)]
    if not links:
        return []
    plan = plan_links(links, teacher, student)
    shapes = probe_shapes(plan, student.build(dataset.num_classes, dataset.input_shape),
                          teacher.build(dataset.num_classes, dataset.input_shape), dataset.example(2), student, teacher)
    return [int(k) for k in links if len(shapes[0][k]) in (3, 4) and len(shapes[1][k]) in (3, 4)]


def _check_resources(spec) -> None:
    if not isinstance(spec.seeds, int) or spec.seeds < 1:
        raise ConfigError(f"seeds={spec.seeds!r}: must be a whole number >= 1")
    if not spec.cpus_per_trial > 0:
        raise ConfigError(f"cpus_per_trial={spec.cpus_per_trial}: must be > 0")
    if not spec.gpus_per_trial >= 0:
        raise ConfigError(f"gpus_per_trial={spec.gpus_per_trial}: must be >= 0")
    if spec.max_concurrent is not None and spec.max_concurrent < 1:
        raise ConfigError(f"max_concurrent={spec.max_concurrent}: must be >= 1")
    from kdtune.train.fusion import parse_fuse

    parse_fuse(spec.fuse)
    if spec.image_size is not None and (not isinstance(spec.image_size, int) or spec.image_size < 1):
        raise ConfigError(f"image_size={spec.image_size!r}: must be a whole number of pixels >= 1")


def _is_builtin(dataset) -> bool:
    from kdtune.data import dataset_names

    return isinstance(dataset, str) and dataset in dataset_names()


def _is_trained_module(teacher) -> bool:
    from torch import nn

    return isinstance(teacher, nn.Module)


def _check_overrides(overrides: dict, configs: list[TrialConfig]) -> None:
    """A value set for every trial (--set) that is neither shared nor declared by any of the study's methods is a
    mistake (a typo, or a parameter of a method the study does not run): one line naming what is allowed."""
    shared = TrialConfig.field_names()
    methods = sorted({c.method for c in configs})
    declared = {p.name for c in configs for p in c.method_class.params}
    for key, value in overrides.items():
        for cls in {c.method_class for c in configs}:  # a bad value is refused even where a search would set it
            for param in cls.params:
                if param.name == key:
                    param.check(value, f"method {cls.name!r}")
        if key not in shared and key not in declared:
            raise ConfigError(f"--set {key}: neither a shared trial key nor a parameter of this study's methods "
                              f"({', '.join(methods)}); their parameters: {', '.join(sorted(declared)) or 'none'}; "
                              f"shared keys: {', '.join(sorted(shared))}")


def _method(config: TrialConfig):

    return config.method_class(config)


def _without_label(variant: dict) -> dict:
    return {k: v for k, v in variant.items() if k not in ("label", "point")}


def _check_against_data(configs: list[TrialConfig], dataset: Dataset, student, teacher, students=None) -> None:
    """What needs the data and the networks: augmentation, the logit cache, links (each distinct case once)."""
    from kdtune.train.recipe import training_augmentation
    from kdtune.train.linking import check_method_on_models

    seen_augment, seen_links = set(), set()
    for config in configs:
        recipe = config.augment_recipe(dataset.default_augment)
        if recipe not in seen_augment:
            seen_augment.add(recipe)
            training_augmentation(config, dataset)
        if config.teacher_cache == "on" and recipe:
            raise ConfigError(
                f"teacher_cache='on' with augment={recipe!r}: cached teacher logits are computed on un-augmented "
                "samples and would not match augmented inputs; set augment=none or teacher_cache='off'")
        if config.teacher_cache == "on" and not dataset.in_memory:
            raise ConfigError(
                "teacher_cache='on' with a dataset streamed from disk: kdtune caches teacher logits only for "
                "in-memory data; set teacher_cache='auto' (the teacher then runs on every batch) or give a "
                "larger memory budget")
        key = (config.method, config.params, config.link_spatial, config.student)
        if key not in seen_links:
            seen_links.add(key)
            try:
                check_method_on_models(config, dataset, (students or {}).get(config.student, student), teacher)
            except ConfigError as error:  # a Pareto study: say which candidate the links do not fit
                if not students:
                    raise
                raise ConfigError(f"student {config.student}: {error}") from None


def _sample_search_space(search, base: StudyBase, samples: int = 48) -> list[TrialConfig]:
    """Draw configurations from the define-by-run space (random sampler) and validate each one now,
    so a bad range fails before any trial instead of inside one."""
    import optuna

    if search.num_samples < 1:
        raise ConfigError(f"num_samples={search.num_samples}: must be >= 1")
    if search.time_budget_s is not None and search.time_budget_s <= 0:
        raise ConfigError(f"time_budget_s={search.time_budget_s}: must be > 0")
    configs = [base.trial(point) for point in search.points_to_evaluate]
    with logger_level("optuna", logging.WARNING):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=search.seed))
        for _ in range(samples):
            trial = study.ask()
            constants = search.suggest(trial) or {}
            configs.append(base.trial({**trial.params, **constants}))
            study.tell(trial, 0.0)
    return configs
