"""kdtune: Ray-distributed hyperparameter studies for knowledge distillation, tracked in MLflow.

The Python API is the same mechanism as the study scripts: objects or reference texts, resolved once.

    import kdtune
    study = kdtune.StudySpec(name="my_kd", dataset=kdtune.data.from_arrays(x_tr, y_tr, x_te, y_te),
                             teacher=my_trained_teacher, student=lambda n, shape: MyStudent(n),
                             variants=[{"label": "baseline", "method": "none"},
                                       {"label": "T=4", "method": "kd", "temperature": 4, "alpha": 0.9}])
    result = kdtune.run_study(study)
"""

__version__ = "0.1.0"

_API = {"StudySpec": "kdtune.study", "Search": "kdtune.study", "run_study": "kdtune.study",
        "ModelRef": "kdtune.models.refs", "model_ref": "kdtune.models.refs", "Dataset": "kdtune.data",
        "load_student": "kdtune.serving"}


def __getattr__(name):
    # late imports: `import kdtune` stays cheap (no torch, no Ray) for the CLI and for Ray workers
    import importlib

    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name in ("data", "sources", "study", "models"):
        return importlib.import_module(f"kdtune.{name}")
    raise AttributeError(f"module 'kdtune' has no attribute {name!r}")
