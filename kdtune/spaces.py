"""Define-by-run search spaces for Optuna: a parameter is sampled only where the chosen method uses it.

A space is a picklable object (Ray Tune checkpoints the Optuna searcher with pickle, which refuses closures).
"""
from __future__ import annotations

from dataclasses import dataclass

SOFT_METHODS = {"kd", "links", "hints", "fsp"}  # a soft term (T, alpha); fsp/hints: in their second stage
LINK_METHODS = {"links", "hints"}  # a link set and its weight beta
TWO_STAGE_METHODS = {"hints", "fsp", "adversarial_pretrained"}  # stage1_epochs
ADVERSARIAL_METHODS = {"adversarial", "adversarial_pretrained"}  # adv_weight, discriminator settings


def candidate_link_sets(common: list[int]) -> list[str]:
    """Link sets on the numbered links a pair shares: each single link, adjacent pairs, and all of them."""
    sets = [str(k) for k in common] + [f"{a},{b}" for a, b in zip(common, common[1:])]
    if len(common) > 2:
        sets.append(",".join(map(str, common)))
    return sets


@dataclass
class MethodSpace:
    """method -> its own parameters: T and alpha where a soft term exists, beta and a link set with links,
    FSP weight with FSP pairs, first-stage length for two-stage methods, loss weights and the discriminator's
    learning rate for adversarial methods."""

    methods: tuple[str, ...]
    link_sets: tuple[str, ...]
    fsp_pairs: str = ""  # the model pair's section pairs, e.g. "1-2,3-4,5-6" (empty: fsp not searchable)
    temperature: tuple[float, float] = (0.5, 20.0)
    alpha: tuple[float, float] = (0.05, 1.0)
    beta: tuple[float, float] = (0.01, 10.0)
    stage1_epochs: tuple[int, int] = (1, 5)
    adv_weight: tuple[float, float] = (0.01, 10.0)
    disc_lr: tuple[float, float] = (1e-4, 1e-1)

    def __call__(self, trial) -> dict:
        method = trial.suggest_categorical("method", list(self.methods))
        constants = {}
        if method in SOFT_METHODS:
            trial.suggest_float("temperature", *self.temperature, log=True)
            trial.suggest_float("alpha", *self.alpha)
        if method in LINK_METHODS:
            trial.suggest_float("beta", *self.beta, log=True)
            trial.suggest_categorical("links", list(self.link_sets))
        if method == "fsp":
            trial.suggest_float("beta", *self.beta, log=True)
            constants["fsp_pairs"] = self.fsp_pairs
        if method in TWO_STAGE_METHODS:
            trial.suggest_int("stage1_epochs", *self.stage1_epochs)
        if method in ADVERSARIAL_METHODS:
            trial.suggest_float("adv_weight", *self.adv_weight, log=True)
            trial.suggest_float("disc_lr", *self.disc_lr, log=True)
        if method == "adversarial":
            trial.suggest_float("l1_weight", *self.adv_weight, log=True)
        return constants
