"""Define-by-run search spaces for Optuna: a parameter is sampled only where the chosen method uses it.

A space is a picklable object (Ray Tune checkpoints the Optuna searcher with pickle, which refuses closures).
"""
from __future__ import annotations

from dataclasses import dataclass

from kdtune import models

SOFT_METHODS = {"kd", "links"}
LINK_METHODS = {"links"}


def candidate_link_sets(teacher: str, student: str) -> list[str]:
    """Link sets on the links a pair shares: each single link, adjacent pairs, and all of them."""
    common = sorted(set(models.model_spec(teacher).link_points) & set(models.model_spec(student).link_points))
    sets = [str(k) for k in common] + [f"{a},{b}" for a, b in zip(common, common[1:])]
    if len(common) > 2:
        sets.append(",".join(map(str, common)))
    return sets


@dataclass
class MethodSpace:
    """method -> its own parameters: T and alpha where a soft term exists, beta and a link set with links."""

    methods: tuple[str, ...]
    link_sets: tuple[str, ...]
    temperature: tuple[float, float] = (0.5, 20.0)
    alpha: tuple[float, float] = (0.05, 1.0)
    beta: tuple[float, float] = (0.01, 10.0)

    def __call__(self, trial) -> None:
        method = trial.suggest_categorical("method", list(self.methods))
        if method in SOFT_METHODS:
            trial.suggest_float("temperature", *self.temperature, log=True)
            trial.suggest_float("alpha", *self.alpha)
        if method in LINK_METHODS:
            trial.suggest_float("beta", *self.beta, log=True)
            trial.suggest_categorical("links", list(self.link_sets))
