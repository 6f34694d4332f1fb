"""What a study resolves once, in the driver, and every trial receives as objects: `StudyParts`.

    dataset          a kdtune Dataset (tensors, or file paths for a streamed one)
    student, teacher ModelRefs (kdtune/models/refs.py): built-in, torchvision:, timm:, module:factory, objects
    teacher_state    the teacher's weights (from the registry, a file, pretrained + fine-tuned, or trained now);
                     a list of weights for an ensemble teacher (kdtune/ensemble.py), built as an EnsembleTeacher
    teacher_logits   cached teacher logits on un-augmented training samples (row i = sample i), or None;
                     an ensemble's are its members' logits, (members, N, C)

Ray puts a StudyParts in the object store once (`tune.with_parameters`); a trial builds its student from the
reference and never resolves a name. `trainer_for` is the same path for scripts and tests that start from a
TrialConfig's texts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdtune.config import TrialConfig
from kdtune.data import Dataset


@dataclass
class StudyParts:
    dataset: Dataset
    student: object  # ModelRef
    teacher: object | None = None  # ModelRef
    teacher_state: dict | list[dict] | None = None
    teacher_logits: torch.Tensor | None = None

    def build_teacher(self) -> nn.Module | None:
        """The teacher network; for a list of states, an EnsembleTeacher whose forward stacks the members' logits."""
        if self.teacher is None or self.teacher_state is None:
            return None
        if isinstance(self.teacher_state, (list, tuple)):
            from kdtune.train.ensemble_teacher import EnsembleTeacher

            return EnsembleTeacher([self._network(state) for state in self.teacher_state])
        return self._network(self.teacher_state)

    def _network(self, state: dict) -> nn.Module:
        teacher = self.teacher.build(self.dataset.num_classes, self.dataset.input_shape)
        teacher.load_state_dict(state)
        return teacher

    @property
    def teacher_members(self) -> int:
        return len(self.teacher_state) if isinstance(self.teacher_state, (list, tuple)) else 1

    def trainer(self, config: TrialConfig, device: torch.device | None = None, student: nn.Module | None = None,
                teacher=None):
        """A Trainer for one trial: a fresh student from its reference (or `student`, e.g. pretrained weights);
        `teacher`: a function several trainers share (fused students) that builds the network once, else the
        teacher is built when the trial needs it."""
        from kdtune.train.trainer import Trainer
        from kdtune.train.linking import plan_links

        method = config.method_class(config)
        links = plan_links(method.link_keys(), self.teacher, self.student)
        if student is None:
            torch.manual_seed(config.seed)  # the student's initial weights depend on the trial's seed alone
            student = self.student.build(self.dataset.num_classes, self.dataset.input_shape)
        return Trainer(config, self.dataset, student, teacher or self.build_teacher, teacher_logits=self.teacher_logits,
                       links=links, device=device)

    def fused_trainers(self, configs: list[TrialConfig], device: torch.device | None = None):
        """(trainers, shared teacher) for members that train together (kdtune/train/fusion.py): one teacher network,
        built the first time a member asks for it (each Trainer decides, as it does alone, whether it runs the
        teacher online), else None."""
        import functools

        from kdtune.train.devices import pick_device

        device = device or pick_device()
        shared = functools.cache(self.build_teacher)
        trainers = [self.trainer(c, device, teacher=shared) for c in configs]
        return trainers, next((t.teacher for t in trainers if t.teacher is not None), None)


def trainer_for(config: TrialConfig, dataset: Dataset, teacher_state: dict | list[dict] | None = None,
                teacher_logits: torch.Tensor | None = None, device: torch.device | None = None):
    """A Trainer from a config's model texts (built-in names or any other reference form)."""
    from kdtune.models.refs import model_ref

    parts = StudyParts(dataset, model_ref(config.student), model_ref(config.teacher), teacher_state, teacher_logits)
    return parts.trainer(config, device)


def teacher_network(spec, state: dict, dataset: Dataset) -> nn.Module:
    """A teacher built from a reference (text or object) and its weights."""
    from kdtune.models.refs import model_ref

    return StudyParts(dataset, None, model_ref(spec), state).build_teacher()
