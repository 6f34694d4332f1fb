"""kdtune: Ray-distributed hyperparameter studies for knowledge distillation, tracked in MLflow."""

__version__ = "0.1.0"
