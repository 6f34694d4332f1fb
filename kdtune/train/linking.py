"""Links between a teacher and a student: which module of each network a link reads, checked on real models.

A link is a number both models declare (built-in models name their link points: VGG-16/VGG-7 links 1-6 of
seed 000 Table 1) or a pair of module paths "teacher.path=student.path", which works for any nn.Module
(torchvision, timm, a user's own). `plan_links` turns a method's links into module paths once; features are then
captured by forward hooks on those modules (`models.FeatureTap`).

`check_method_on_models` runs what a trial would run before its first step (build both networks, one probe
forward, the method's set-up from the real feature shapes), so a path that does not exist or two features no
adapter can join are refused in the driver, before any trial starts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdtune.config import EMBEDDING, TrialConfig, is_numbered
from kdtune.errors import ConfigError


@dataclass(frozen=True)
class LinkPlan:
    """link -> module path, in the teacher and in the student."""

    teacher: dict[str, str]
    student: dict[str, str]

    @classmethod
    def empty(cls) -> "LinkPlan":
        return cls({}, {})

    def only(self, links) -> "LinkPlan":
        return LinkPlan({k: self.teacher[k] for k in links}, {k: self.student[k] for k in links})


def plan_links(links, teacher_ref, student_ref) -> LinkPlan:
    """Module paths for each link; a number must be a link point of both models."""
    from kdtune.models import EMBEDDING_PATH

    teacher, student = {}, {}
    for link in links:
        if link == EMBEDDING:
            teacher[link], student[link] = EMBEDDING_PATH, EMBEDDING_PATH
        elif is_numbered(link):
            number = int(link)
            t_points = teacher_ref.link_points if teacher_ref is not None else {}
            s_points = student_ref.link_points
            if number not in t_points or number not in s_points:
                common = sorted(set(t_points) & set(s_points))
                teacher_name = teacher_ref.spec if teacher_ref is not None else "the teacher"
                raise ConfigError(
                    f"links: link {number} is not a link point of both {teacher_name} and {student_ref.spec}; "
                    f"allowed: {', '.join(map(str, common)) or 'none (name modules: teacher.path=student.path)'}")
            teacher[link], student[link] = t_points[number], s_points[number]
        else:
            teacher[link], student[link] = link.split("=", 1)
    return LinkPlan(teacher, student)


def probe_shapes(plan: LinkPlan, student: nn.Module, teacher: nn.Module | None, sample: torch.Tensor,
                 student_ref=None, teacher_ref=None) -> tuple[dict, dict]:
    """Feature shapes at every link from one forward pass in eval mode (modes restored afterwards)."""
    from kdtune import models
    from kdtune.models.inspect import check_module_path

    shapes = []
    for model, paths, ref, role in ((student, plan.student, student_ref, "student"),
                                    (teacher, plan.teacher, teacher_ref, "teacher")):
        if model is None or not paths:
            shapes.append({})
            continue
        for path in paths.values():
            check_module_path(model, path, role, ref.spec if ref is not None else None)
        tap = models.FeatureTap(model, paths)
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(sample)
            shapes.append({k: v.shape for k, v in tap.features.items()})
        finally:
            tap.remove()
            model.train(was_training)
    return shapes[0], shapes[1]


def check_method_on_models(config: TrialConfig, dataset, student_ref, teacher_ref) -> None:
    """Build both networks, probe the linked features and set the method up, as a trial would."""

    method = config.method_class(config)
    links = method.link_keys()
    if not links and not method.needs_teacher:
        return
    plan = plan_links(links, teacher_ref, student_ref)
    student = student_ref.build(dataset.num_classes, dataset.input_shape)
    teacher = teacher_ref.build(dataset.num_classes, dataset.input_shape) if links else None
    student_shapes, teacher_shapes = probe_shapes(plan, student, teacher, dataset.example(2), student_ref, teacher_ref)
    method.bind_data(torch.as_tensor(dataset.split(config.val_fraction)[0], dtype=torch.int64))
    method.setup(student_shapes, teacher_shapes, num_classes=dataset.num_classes)
