"""Define-by-run search spaces for Optuna, assembled from the methods: a parameter is sampled only where the
chosen method declares it (`Method.params` with a `search`, kdtune/config.py Param), with the method's range
unless the study overrides it.

A space is a picklable object (Ray Tune checkpoints the Optuna searcher with pickle, which refuses closures).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kdtune.errors import ConfigError


def candidate_link_sets(common: list[int]) -> list[str]:
    """Link sets on the numbered links a pair shares: each single link, adjacent pairs, and all of them."""
    sets = [str(k) for k in common] + [f"{a},{b}" for a, b in zip(common, common[1:])]
    if len(common) > 2:
        sets.append(",".join(map(str, common)))
    return sets


@dataclass
class MethodSpace:
    """method -> the parameters that method declares. `link_sets` are the candidates for methods with links,
    `fsp_pairs` the pair's FSP pairs (one value; empty: fsp not searchable), `ranges` overrides a parameter's
    default range by name, e.g. {"temperature": (1.0, 8.0)}. `recipe` names recipe values searched for every
    method, the baseline's "none" included, on a log scale: {"lr": (0.003, 0.03)}; a baseline searched with
    the same recipe ranges and budget is tuned as well as the students."""

    methods: tuple[str, ...]
    link_sets: tuple[str, ...] = ()
    fsp_pairs: str = ""
    ranges: dict[str, tuple] = field(default_factory=dict)
    recipe: dict[str, tuple] = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)  # parameters held at one value, not searched (logit_standardize=True,
    # or what a study sets with --set): each trial gets those its method declares

    def __post_init__(self):
        from kdtune import distill
        from kdtune.config import TrialConfig

        for method in self.methods:
            for param in distill.method_class(method).params:
                if param.search == "link_sets" and not self.link_sets:
                    raise ConfigError(f"method {method!r} in a search needs candidate link sets; these models share "
                                      "no numbered links (give link sets with module paths, teacher.path=student.path)")
                if param.search == "fsp_pairs" and not self.fsp_pairs:
                    raise ConfigError(f"method {method!r} in a search needs fsp_pairs (e.g. '1-2,3-4,5-6')")
        for name, bounds in self.recipe.items():
            if name not in TrialConfig.field_names() or len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
                raise ConfigError(f"recipe range {name}={bounds!r}: expected a config field and (low, high) with "
                                  "0 < low <= high")
        searched = {p.name: p for m in self.methods for p in distill.method_class(m).params
                    if isinstance(p.search, tuple) and p.numeric}
        for name, bounds in self.ranges.items():
            if name not in searched:
                raise ConfigError(f"ranges: {name!r} is not a searched parameter of the methods "
                                  f"({', '.join(self.methods)}); allowed: {', '.join(sorted(searched)) or 'none'}")
            for end in bounds:  # a range the method would refuse fails here, not in every trial
                searched[name].check(end, "a search range")

    def __call__(self, trial) -> dict:
        from kdtune import distill

        method = trial.suggest_categorical("method", list(self.methods))
        declared = distill.method_class(method).params
        constants = {p.name: self.fixed[p.name] for p in declared if p.name in self.fixed}
        for param in declared:
            if param.name in self.fixed:
                continue
            if param.search == "link_sets":
                trial.suggest_categorical(param.name, list(self.link_sets))
            elif param.search == "fsp_pairs":
                constants[param.name] = self.fsp_pairs
            elif isinstance(param.search, tuple) and param.numeric:
                low, high = self.ranges.get(param.name, param.search)
                if param.kind == "int":
                    trial.suggest_int(param.name, int(low), int(high), log=param.log)
                else:
                    trial.suggest_float(param.name, float(low), float(high), log=param.log)
            elif isinstance(param.search, tuple):
                trial.suggest_categorical(param.name, list(param.search))
        for name, (low, high) in self.recipe.items():
            trial.suggest_float(name, low, high, log=True)
        return constants

    def default_point(self, method: str, recipe: dict | None = None) -> dict:
        """The method's own defaults (its paper's setting) for the parameters this space searches, as a first
        point to evaluate, so a search never does worse than the published setting it could have tried."""
        from kdtune import distill

        point = {"method": method, **(recipe or {})}
        for param in distill.method_class(method).params:
            bounds = self.ranges.get(param.name, param.search)
            if param.name in self.fixed:
                continue
            if param.numeric and isinstance(bounds, tuple) and bounds[0] <= param.default <= bounds[1]:
                point[param.name] = param.default
        return point
