"""Every fact kdtune writes to MLflow and reads back, named once: run tags, artifact paths, registered-model
names, aliases and version tags. Writers (kdtune/trial.py, study.py, teachers.py, pareto/, tracking/) and readers
(kdtune/report/, warmstart.py, the `kdtune` command) import these names; no module spells one as a literal.

Core layer: imports nothing (no MLflow, no torch).
"""
from __future__ import annotations

# ---- run tags --------------------------------------------------------------------------------------------
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: a trial's run under its study run
ROLE_TAG = "kdtune.role"  # study | student | teacher
ROLE_STUDY, ROLE_STUDENT, ROLE_TEACHER = "study", "student", "teacher"
STUDY_TAG = "kdtune.study"  # a study run: the study's name
LABEL_TAG = "kdtune.label"  # a student run: its setting's label (a row of the table)
POINT_TAG = "kdtune.point"  # a student run: the tuned point of its setting
OVERRIDES_TAG = "kdtune.overrides"  # a student run: its config's overrides, JSON
STUDENT_TAG = "kdtune.student"  # a student run of a Pareto study: the architecture
TRIAL_KEY_TAG = "kdtune.trial_key"  # a student run: which trial member it is (one run per member, resumes included)
TUNE_TRIAL_TAG = "kdtune.tune_trial"  # every member run of one Tune trial carries its id
FAILURE_TAG = "kdtune.failure"  # a failed run: why
STOPPED_TAG = "kdtune.stopped_early_at_epoch"  # a run ASHA stopped
TEACHER_TAG = "kdtune.teacher"  # a study run: where its teacher came from
TEACHER_INIT_TAG = "kdtune.teacher.init"  # a teacher's training run: what it started from
TEACHERS_TAG = "kdtune.teachers"  # a study run: JSON list of {"member", "source", "val_acc", "test_acc"}
TEACHER_WEIGHTS_TAG = "kdtune.teacher_weights"  # a study run: the fingerprint of the teacher's weights
TEACHER_VERSION_TAG = "kdtune.teacher_version"  # a study run: "name/version" of a registered teacher
TRAIN_SET_TAG = "kdtune.train_set"  # a study run: the training samples' fingerprint
WARM_TAG = "kdtune.warm_start"  # a warm-started trial's run: the study whose point it re-ran
BEST_TAG = "kdtune.best"  # a study run: the best setting's label
REGISTERED_TAG = "kdtune.registered"  # a study run: "NAME version V @ALIAS"
WEIGHTS_TAG = "kdtune.weights_uri"  # a student run whose training finished: its weights' artifact URI
MODEL_TAG = "kdtune.model_uri"  # a student run also logged as a servable model: its model URI

# a Pareto study (kdtune/pareto/)
PHASE_TAG = "kdtune.pareto.phase"  # search | baseline_search | front | baseline
ON_FRONT_TAG = "kdtune.pareto.on_front"
COST_TAG = "kdtune.pareto.cost"  # the study run: the front's cost axis
DEVICE_TAG = "kdtune.pareto.device"  # the study run: where latency was measured

# a Pareto study's cost metrics on student runs, and their words
COST_TEXT = {"latency_ms_batch1": "latency at batch 1 (ms)", "latency_ms_per_image": "latency per image in a "
             "batch (ms)", "params": "parameters", "flops": "FLOPs per sample"}


def cost_metric(key: str) -> str:
    return f"cost_{key}"


# ---- labels of the results table ---------------------------------------------------------------------------
BASELINE_LABEL = "baseline"  # the student trained without distillation
FRONT_PREFIX, BASELINE_PREFIX = "front: ", "baseline: "  # a Pareto study's confirm rows
INT8_PREFIX = "int8: "  # a Pareto front's int8 twin

# ---- artifacts ---------------------------------------------------------------------------------------------
WEIGHTS_ARTIFACT = "weights/student.pt"  # not under "student/": MLflow 3 reads that path as a logged model's
STUDENT_MODEL = "student"  # a servable student's MLflow model name in its run
INT8_MODEL = "student_int8"  # an int8 twin's MLflow ONNX model, beside the fp32 one

# ---- the registry ------------------------------------------------------------------------------------------
CHAMPION, CHALLENGER = "champion", "challenger"  # aliases the gate moves
FRONT_STUDY_TAG = "pareto_study_run"  # version tag of every registered front member: the study run that made it
PRECISION_TAG = "precision"  # version tag: float32 | int8
INT8 = "int8"
GATE_TAG = "gate"  # version tag: the gate's reason


def student_model_name(dataset: str, student: str) -> str:
    """The registered model a best-setting study registers into by default."""
    return f"kdtune-{dataset}-{student}"


def pareto_model_name(dataset: str) -> str:
    """The registered model a Pareto study registers its front into by default."""
    return f"kdtune-{dataset}-pareto"


def teacher_model_name(dataset: str, architecture: str) -> str:
    """The registered model of the teachers kdtune trains for a dataset and architecture."""
    return f"kdtune-teacher-{dataset}-{architecture}"


KDTUNE_MODELS = "name LIKE 'kdtune-%'"  # a registry filter: every model kdtune registered
TEACHER_MODELS = "name LIKE 'kdtune-teacher-%'"

# ---- recorded with them ------------------------------------------------------------------------------------
NODE_TAG = "kdtune.node_id"  # a trial attempt's Ray node
DEVICE_TAG_OF_RUN = "kdtune.device"  # a trial attempt's device
SAMPLES_TAG = "kdtune.samples"  # a dataset input: the split's size
FINGERPRINT_TAG = "kdtune.fingerprint"  # a dataset input: kdtune's fingerprint of the split
HELD_OUT_TAG = "kdtune.validation_held_out"  # the training input: validation samples carved from it
DATASET_SOURCE_KEY = "kdtune.dataset"  # a dataset input's source: the dataset's name
PRECISION_META = "kdtune.precision"  # an exported file's metadata: float32 | int8
