"""What a study kind (kdtune/study_kind.py) reads of the study being run: a small frozen object, so a kind
never reaches into the driver's own state (kdtune/study.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class StudyContext:
    """What a kind reads of the study being run (the driver's own state stays in kdtune/study.py)."""

    spec: Any  # the StudySpec
    resolved: Any  # the ResolvedStudy (kdtune/resolve.py)
    client: Any  # the MlflowClient of the study's tracking server
    echo: Callable[[str], None]

    @property
    def dataset(self):
        return self.resolved.dataset

    @property
    def base(self) -> "StudyBase":
        return self.resolved.base

    @property
    def teacher_cfg(self):
        return self.resolved.teacher_config
