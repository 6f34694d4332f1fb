"""Plan a study's teacher once, in the driver: `TeacherSource` says where its weights come from.

    None (default)          the registered teacher for this dataset and architecture, else trained once now;
                            a registered teacher trained on other samples under the same dataset name is refused
    "train"                 train a new teacher now (and register it as the new champion)
    "train:S"               train a new teacher now with seed S (registered with alias seedS; it becomes
                            champion only where there is none): another member for an ensemble
    "pretrained"            the architecture's library weights (torchvision DEFAULT, timm pretrained=True, or
                            ImageNet VGG-16 conv layers for the built-in vgg16), new head, fine-tuned here
                            for the teacher recipe's epochs (seed 000's protocol), then registered
    "models:/..." "runs:/"  a model in the MLflow registry or a run
    a file path             a state dict, a kdtune trial checkpoint, or a whole saved nn.Module
    an nn.Module (Python)   the object itself: its weights are the teacher
    a list of sources       an ensemble (kdtune/ensemble.py): each member planned and obtained as above

Obtaining the planned teacher (reading its weights, or training and registering one) is
kdtune/teacher_training.py; the registered teacher is `kdtune-teacher-<dataset>-<architecture>` (alias
`champion`, and `seed<S>` for each training seed S).
A registered teacher named by a models:/ URI whose `train_set` tag records other training samples than this
dataset's is refused before the study creates anything, as the default registered teacher is.

The teacher never trains on a sample its students are validated on (else those samples steer selection on
validation through its soft targets). A teacher trained in the study trains on the students' training split (its
val_fraction is theirs: kdtune/resolve.py); a registered one records the split it trained on (tags val_fraction
and fit_set; older ones: their training run's val_fraction param) and is reused only where its training samples
exclude the study's validation split at every val_fraction the study's students use, else refused with the fix
(`split_refusal`). A teacher from a file or a Python object records nothing kdtune can check.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdtune.data import Dataset
from kdtune.errors import ConfigError, TrackingError
from kdtune.tracking import network_state

TEACHER_ALIAS = "champion"
PRETRAINED = "pretrained"
TRAIN = "train"
TRAIN_SEEDED = "train:"  # train:S


def seed_alias(seed: int) -> str:
    return f"seed{seed}"


@dataclass
class Teacher:
    state_dict: dict
    source: str  # where it came from: a models:/ URI, a file path, "python object"
    trained_now: bool
    test_acc: float | None = None
    members: list["Teacher"] | None = None  # an ensemble: its members (state_dict is then their list of states)
    version: str = ""  # a registered teacher: "name/version", the version its alias resolved to when it was read

    @property
    def versions(self) -> str:
        """The registered version(s) behind this teacher ("" for none), e.g. "kdtune-teacher-digits-x/3"."""
        return " + ".join(m.version or "-" for m in self.members) if self.members else self.version


def weights_fingerprint(state) -> str:
    """The teacher's exact identity: a digest of its weights (each tensor's name, dtype, shape and values); an
    ensemble's (a list of states) of its members' in order. An alias (models:/...@champion) names whichever
    version it points at now; this names the weights a study distilled from."""
    import hashlib

    digest = hashlib.sha1()
    for member in state if isinstance(state, list) else [state]:
        for name in sorted(member):
            value = member[name]
            if not isinstance(value, torch.Tensor):
                digest.update(f"{name}={value!r};".encode())
                continue
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        digest.update(b"|")
    return f"sha1:{digest.hexdigest()[:20]}"


def resolved_version(uri: str) -> str:
    """"name/version" of the registered model version a models:/name@alias (or models:/name/N) URI names now;
    "" when it is not a registered model or cannot be read."""
    import mlflow

    if not uri.startswith("models:/"):
        return ""
    name, alias_or_version = _registered_version(uri)
    if name is None:
        return ""
    if alias_or_version.isdigit():
        return f"{name}/{alias_or_version}"
    try:
        return f"{name}/{mlflow.MlflowClient().get_model_version_by_alias(name, alias_or_version).version}"
    except mlflow.exceptions.MlflowException:
        return ""


def registry_name(dataset: str, arch: str) -> str:
    return f"kdtune-teacher-{dataset}-{arch}"


def fit_state(state: dict, ref, dataset: Dataset, source: str) -> dict:
    """Check that weights fit the architecture built for this dataset; return them as that model's state."""
    model = ref.build(dataset.num_classes, dataset.input_shape)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"teacher {source}: weights do not fit model {ref.spec!r} for {dataset.name} "
                          f"({first})") from None
    return model.state_dict()


def read_weights_file(source: str) -> dict:
    """A state dict, a kdtune trial checkpoint ({"student": ...}) or a whole saved module, read from a file."""
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"teacher_source={source!r}: no such file (give a models:/name@alias URI, a .pt file, "
                          "or 'pretrained')")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch.save(model) pickles the class itself: only the weights-only reader refuses it. The user named
        # this file as their teacher, so it is trusted like their own code.
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise ConfigError(f"teacher_source={source!r}: not a PyTorch weights file ({type(error).__name__}: "
                              f"{error})") from None
    except Exception as error:
        raise ConfigError(f"teacher_source={source!r}: not a PyTorch weights file ({type(error).__name__})") from None
    if isinstance(state, nn.Module):
        return state.state_dict()
    if isinstance(state, dict) and isinstance(state.get("student"), dict):
        return state["student"]  # a kdtune trial checkpoint
    if not isinstance(state, dict):
        raise ConfigError(f"teacher_source={source!r}: holds a {type(state).__name__}, not a state dict or module")
    return state


def load_teacher_state(source: str, ref, dataset: Dataset) -> dict:
    """Read a teacher's weights from `models:/...`, `runs:/...` or a file, and check they fit the architecture."""
    if source.startswith(("models:/", "runs:/")):
        import mlflow

        try:
            loaded = mlflow.pytorch.load_model(source, map_location="cpu")
        except Exception as error:  # MLflow raises several types for a missing model/alias
            raise TrackingError(f"teacher {source}: could not be loaded from MLflow ({type(error).__name__}: "
                                f"{str(error).splitlines()[0] if str(error) else ''})") from None
        state = network_state(loaded)
    else:
        state = read_weights_file(source)
    return fit_state(state, ref, dataset, source)


def registered_teacher_uri(dataset: Dataset, ref, log=print, val_fractions=()) -> str | None:
    """The registered teacher's URI if one exists for this dataset and architecture, after checking it was
    trained on this dataset's training samples (a dataset name alone, e.g. two folders both called 'data',
    says nothing: a teacher that has seen this dataset's test samples would leak them into every student) and
    that none of them is in the students' validation split at any of `val_fractions` (`split_refusal`)."""
    import mlflow

    from kdtune.registry import train_set_fingerprint

    name = registry_name(dataset.name, ref.name)
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, TEACHER_ALIAS)
    except mlflow.exceptions.MlflowException:
        return None
    recorded, ours = version.tags.get("train_set"), train_set_fingerprint(dataset)
    if recorded is None:
        log(f"teacher: {name} version {version.version} records no training set (registered by an older kdtune); "
            "reusing it as before (--teacher-source train trains a new one)")
    elif recorded != ours:
        raise ConfigError(f"the registered teacher {name}@{TEACHER_ALIAS} was trained on other samples (train set "
                          f"{recorded}) than this dataset {dataset.name!r} ({ours}); give --teacher-source train "
                          "to train one on this data, or name a teacher with --teacher-source")
    what = f"the registered teacher {name}@{TEACHER_ALIAS} (version {version.version})"
    refusal = split_refusal(what, version_val_fraction(client, version), version.tags.get("fit_set"), dataset,
                            val_fractions)
    if refusal:
        raise ConfigError(f"{refusal}; give --teacher-source train to train a teacher on this study's training "
                          "split")
    return f"models:/{name}@{TEACHER_ALIAS}"


def version_val_fraction(client, version) -> float | None:
    """The val_fraction a registered teacher trained with: its tag, else its training run's param (teachers
    registered before kdtune tagged it), else None (unknown)."""
    import mlflow

    value = version.tags.get("val_fraction")
    if value is None and version.tags.get("run_id"):
        try:
            value = client.get_run(version.tags["run_id"]).data.params.get("val_fraction")
        except mlflow.exceptions.MlflowException:
            value = None
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def split_refusal(what: str, teacher_fraction: float | None, fit_set: str | None, dataset: Dataset,
                  val_fractions, to_train: bool = False) -> str | None:
    """Why a teacher that trained on the training split left by `teacher_fraction` must not teach students that
    validate at `val_fractions` (it saw some of their validation samples, which would then steer selection on
    validation), or None when its training samples and every such validation split are disjoint."""
    from kdtune.registry import training_split_fingerprint

    val_fractions = sorted(set(val_fractions))
    if not val_fractions:
        return None
    shown = ", ".join(f"{f:g}" for f in val_fractions)
    if teacher_fraction is None:
        return (f"{what} records neither the val_fraction it trained with nor its training run, so kdtune cannot "
                f"tell whether it saw this study's validation samples (val_fraction {shown})")
    if fit_set is not None and fit_set != training_split_fingerprint(dataset, teacher_fraction):
        return (f"{what} trained on other samples ({fit_set}) than this dataset's training split at val_fraction "
                f"{teacher_fraction:g}, so kdtune cannot tell whether it saw this study's validation samples")
    trained_on = dataset.split(teacher_fraction)[0]
    held_out = torch.unique(torch.cat([dataset.split(f)[1] for f in val_fractions]))
    seen = int(torch.isin(held_out, trained_on).sum())
    if not seen:
        return None
    trained, include = ("would train", "would include") if to_train else ("trained", "include")
    return (f"{what} {trained} with val_fraction={teacher_fraction:g}: its training samples {include} {seen} of the "
            f"{len(held_out)} samples this study validates its students on (val_fraction {shown}), which would "
            f"leak into selection on validation (with --set val_fraction={teacher_fraction:g} none would)")


@dataclass
class TeacherPlan:
    """What the driver found before anything was created: weights in hand, or what to train from."""

    source: str | None  # as the user gave it (None: registry, else train)
    state: dict | None = None  # weights already read (file, Python object)
    initial_state: dict | None = None  # pretrained weights to fine-tune from
    registered: str | None = None  # source None: the registered teacher found (`find_registered`), if any
    seed: int | None = None  # "train:S": the seed to train with

    @property
    def members(self) -> int:
        return 1

    def find_registered(self, dataset: Dataset, ref, log=print, val_fractions=()) -> None:
        """Look the registry up once the tracking server is up, before the study creates anything; a registered
        teacher (or run) whose training samples hold some of the students' validation samples (at any of
        `val_fractions`) is refused."""
        if self.source is None and self.state is None:
            self.registered = registered_teacher_uri(dataset, ref, log, val_fractions)
        elif self.state is None and str(self.source).startswith("models:/"):
            check_train_set(self.source, dataset, val_fractions, log)
        elif self.state is None and str(self.source).startswith("runs:/"):
            check_run_split(self.source, dataset, val_fractions, log)


@dataclass
class EnsemblePlan:
    """Several teacher sources: each member planned as one teacher is (kdtune/ensemble.py)."""

    plans: list[TeacherPlan]

    @property
    def source(self) -> str:
        return " + ".join(str(p.source) for p in self.plans)

    @property
    def members(self) -> int:
        return len(self.plans)

    @property
    def initial_state(self):
        return None

    def find_registered(self, dataset: Dataset, ref, log=print, val_fractions=()) -> None:
        for plan in self.plans:
            plan.find_registered(dataset, ref, log, val_fractions)


def check_train_set(uri: str, dataset: Dataset, val_fractions=(), log=print) -> None:
    """A registered kdtune teacher records its training samples (tags train_set, val_fraction, fit_set): refuse
    one trained on other samples, or on some of the students' validation samples."""
    import mlflow

    from kdtune.registry import train_set_fingerprint

    name, alias_or_version = _registered_version(uri)
    if name is None:
        return
    client = mlflow.MlflowClient()
    try:
        version = (client.get_model_version(name, alias_or_version) if alias_or_version.isdigit()
                   else client.get_model_version_by_alias(name, alias_or_version))
    except mlflow.exceptions.MlflowException:
        return  # reading it later says what is missing
    recorded, ours = version.tags.get("train_set"), train_set_fingerprint(dataset)
    if recorded is not None and recorded != ours:
        raise ConfigError(f"teacher_source={uri!r} was trained on other samples (train set {recorded}) than this "
                          f"dataset {dataset.name!r} ({ours}); name a teacher trained on this data, or train:S")
    fraction = version_val_fraction(client, version)
    if recorded is None and fraction is None:
        log(f"teacher: {uri} (version {version.version}) records no training samples (not registered by kdtune): "
            "kdtune cannot check that it never saw this study's validation samples")
        return
    refusal = split_refusal(f"teacher_source={uri!r} (version {version.version})", fraction,
                            version.tags.get("fit_set"), dataset, val_fractions)
    if refusal:
        raise ConfigError(f"{refusal}; name a teacher trained on this study's training split, or train:S")


def check_run_split(uri: str, dataset: Dataset, val_fractions=(), log=print) -> None:
    """A teacher named by runs:/RUN_ID/...: a kdtune run records the val_fraction it trained with (its param);
    refuse one that trained on some of the students' validation samples."""
    import mlflow

    run_id = uri[len("runs:/"):].split("/", 1)[0]
    try:
        params = mlflow.MlflowClient().get_run(run_id).data.params
    except mlflow.exceptions.MlflowException:
        return  # reading it later says what is missing
    if params.get("dataset") != dataset.name or "val_fraction" not in params:
        log(f"teacher: {uri} records no training split of {dataset.name!r}: kdtune cannot check that it never saw "
            "this study's validation samples")
        return
    refusal = split_refusal(f"teacher_source={uri!r}", float(params["val_fraction"]), None, dataset, val_fractions)
    if refusal:
        raise ConfigError(f"{refusal}; name a teacher trained on this study's training split, or train:S")


def _registered_version(uri: str) -> tuple[str | None, str]:
    rest = uri[len("models:/"):]
    if "@" in rest:
        return tuple(rest.split("@", 1))
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, version
    return None, ""


def _train_seed(source: str) -> int:
    text = source[len(TRAIN_SEEDED):]
    if not text.isdigit():
        raise ConfigError(f"teacher_source={source!r}: the seed after 'train:' must be a whole number >= 0, "
                          "e.g. train:1")
    return int(text)


def plan_teacher(source, ref, dataset: Dataset):
    """Check a teacher source before any run, folder or version exists (MLflow sources are read later).
    A list (several --teacher-source) plans an ensemble; a list of one is that one source."""
    if isinstance(source, (list, tuple)):
        if len(source) <= 1:
            return plan_teacher(source[0] if source else None, ref, dataset)
        texts = [s for s in source if isinstance(s, str)]  # (two Python modules are two members)
        repeated = next((t for t in texts if texts.count(t) > 1), None)
        if repeated is not None:
            raise ConfigError(f"teacher_source={repeated!r} is given twice: an ensemble of a teacher with itself is "
                              "that teacher; give each member once (train:S with distinct seeds trains new ones)")
        return EnsemblePlan([plan_teacher(s, ref, dataset) for s in source])
    if isinstance(source, str) and source.startswith(TRAIN_SEEDED):
        return TeacherPlan(source, seed=_train_seed(source))
    if isinstance(source, nn.Module):
        return TeacherPlan("python object", state=fit_state(source.state_dict(), ref, dataset, "python object"))
    if source in (None, TRAIN) or str(source).startswith(("models:/", "runs:/")):
        return TeacherPlan(source)
    if source == PRETRAINED:
        model = ref.build_pretrained(dataset.num_classes, dataset.input_shape)
        return TeacherPlan(source, initial_state=model.state_dict())
    return TeacherPlan(str(source), state=load_teacher_state(str(source), ref, dataset))
