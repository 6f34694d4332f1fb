"""The one training loop: stages, optimiser, LR schedule, evaluation and per-term loss logging.

`Trainer` trains one student under one `TrialConfig` (a teacher is trained the same way, with method 'none').
It yields one metrics dict per epoch; the caller (a Tune trial, a teacher task, a test) decides what to do
with it. Its whole state fits in `state_dict()`, so a trial resumes from its last finished epoch.

Stages: a method's stages run in order with one epoch counter across them. Each stage gets a fresh optimiser
and LR schedule over the parameters it trains (the student, or only the part feeding `Stage.train_up_to`,
plus the method's student-side parameters); the hooks a method may use are listed in kdtune/distill/base.py.
A stage with `train_up_to` (FitNets' hint stage, FSP's first stage) changes nothing it does not train: the student
modules whose parameters it leaves alone stay in eval mode (BatchNorm running statistics unchanged, dropout
off), and the forward passes stop once every linked feature is captured (a hook raises the private
`_StopForward`), so the layers after the last link do not run and the batch's logits are None.

Randomness: the student is built under torch.manual_seed(config.seed) (kdtune/train/parts.py); the method's set-up
(adapters, a discriminator) runs under the same seed, whether or not the teacher was built in between (with a
teacher-logit cache it is not), and every epoch reseeds the global generator, so a resumed trial draws what
the uninterrupted one did. `deterministic=True` also makes the kernels deterministic (see kdtune/config.py).
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from contextlib import nullcontext
from typing import Iterator

import torch
from torch import nn

from kdtune import models
from kdtune.config import TrialConfig
from kdtune.data import Dataset, DeviceData, batch_source, test_source
from kdtune.distill.base import Outputs
from kdtune.errors import ConfigError, TrainingDiverged
from kdtune.train.backends import CUBLAS_WORKSPACE, configure_backends
from kdtune.train.devices import cpu_has_native_bf16, pick_device, use_channels_last
from kdtune.train.evaluation import evaluate
from kdtune.train.forward import TeacherPass, run_until
from kdtune.train.linking import LinkPlan
from kdtune.train.recipe import build_optimizer, build_scheduler, training_augmentation


class Trainer:
    """Trains a built student (and its method's parts) against a built teacher or cached teacher logits.

    `teacher` is a network, or a function that builds it (called only when the trial runs the teacher online,
    i.e. not from cached logits). Nothing here looks a name up: the caller resolved the dataset, the networks and the links (a study does it
    once, in the driver; `StudyParts.trainer` and `trainer_for` build a Trainer from references).
    """

    def __init__(self, config: TrialConfig, dataset: Dataset, student: nn.Module, teacher=None,
                 teacher_logits: torch.Tensor | None = None, links: LinkPlan | None = None,
                 device: torch.device | None = None):
        self.config = config
        self.device = device or pick_device()
        if config.deterministic:  # before this trial's first CUDA work, where it can still take effect
            os.environ.setdefault(CUBLAS_WORKSPACE, ":4096:8")
        self._restore_backends = lambda: None
        self.method = config.method_class(config)
        torch.manual_seed(config.seed)

        train_idx, val_idx = dataset.split(config.val_fraction)
        mean, std = dataset.channel_stats(train_idx)
        augment = training_augmentation(config, dataset)
        self.train = batch_source(dataset, train_idx, mean, std, self.device, augment=augment)
        self.val = batch_source(dataset, val_idx, mean, std, self.device)
        self.test = test_source(dataset, mean, std, self.device)
        # Stored with checkpoints and logged models so inputs can be normalised the same way at serving time.
        self.normalisation = {"mean": mean.tolist(), "std": std.tolist(), "scale": dataset.scale}

        self.num_classes = dataset.num_classes
        self.student = student.to(self.device)
        self.channels_last = use_channels_last(self.device, config.precision) and dataset.is_image
        if self.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        if self.device.type == "cpu" and config.precision == "bf16" and not cpu_has_native_bf16():
            warnings.warn("precision='bf16' on a CPU without AMX or AVX512-BF16: its bf16 matmuls are emulated and "
                          "run several times slower than fp32 (benchmarks/RESULTS.md); use precision='fp32' here",
                          RuntimeWarning, stacklevel=2)
        self.teacher = None
        self.teacher_logits = None
        if self.method.needs_teacher:
            self._setup_teacher(dataset, teacher, teacher_logits)
        self.links = links or LinkPlan.empty()
        keys = self.method.link_keys()
        self._student_tap = models.FeatureTap(self.student, self.links.only(keys).student)
        self._teacher_tap = None
        if self.teacher is not None:
            self._teacher_tap = models.FeatureTap(self.teacher, self.links.only(keys).teacher)
        self._probe_and_setup_method()
        self.method.to(self.device)

        self.stages = self.method.stages()
        self.total_epochs = sum(stage.epochs for stage in self.stages)
        self.epoch = 0  # epochs finished, counted across stages
        self.stage_started = -1  # index of the last stage whose start hook ran (it runs once per trial)
        self.stage_metrics: dict[str, float] = {}  # what start hooks reported; repeated in every later epoch
        self._build_optimizer(0)
        self.best_val_acc = -1.0
        self.best_epoch = 0
        self.best_state: dict | None = None
        self.training_time_s = 0.0  # seconds spent in epochs (training + validation), across resumes
        self.test_time_s = 0.0  # the last epoch's test evaluation (not training time)
        self._restore_backends = configure_backends(config, self.device)  # last: nothing after it can fail

    # ---- set-up -------------------------------------------------------------------------------
    def _setup_teacher(self, dataset: Dataset, teacher: nn.Module | None, teacher_logits) -> None:
        config = self.config
        use_cache = teacher_logits is not None and config.teacher_cache != "off"
        if config.teacher_cache == "on" and teacher_logits is None:
            raise ConfigError("teacher_cache='on' but no cached teacher logits were provided to the trial")
        if use_cache and (self.method.needs_teacher_features or self.train.augment):
            if config.teacher_cache == "on":
                raise ConfigError(
                    f"teacher_cache='on': method {config.method!r} with augment={config.augment!r} needs the "
                    "teacher run on every batch (features or augmented inputs); set teacher_cache='auto' or 'off'"
                )
            use_cache = False
        if use_cache:
            expected = (len(dataset.train_labels), dataset.num_classes)
            if tuple(teacher_logits.shape[-2:]) != expected or teacher_logits.dim() not in (2, 3):
                raise ConfigError(f"cached teacher logits have shape {tuple(teacher_logits.shape)}; expected "
                                  f"{expected} (one teacher) or (members, *{expected}) (an ensemble)")
            self.teacher_logits = teacher_logits.to(self.device)
            return
        if callable(teacher) and not isinstance(teacher, nn.Module):
            teacher = teacher()
        if teacher is None:
            raise ConfigError(f"method {config.method!r} needs a teacher, but none was given to the trial")
        teacher.eval().requires_grad_(False)
        self.teacher = teacher.to(self.device)
        if self.channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)

    def _probe_and_setup_method(self) -> None:
        """One forward pass on a single batch to learn the linked feature shapes."""
        images, _, _ = next(self.val.batches(2))
        with torch.no_grad():
            self.student.eval()
            self.student(images)
            if self._teacher_tap is not None and self.method.link_keys():
                self.teacher(images)
        student_shapes = {k: v.shape for k, v in self._student_tap.features.items()}
        teacher_shapes = {k: v.shape for k, v in (self._teacher_tap.features if self._teacher_tap else {}).items()}
        # The method's initial weights depend on the seed alone: building the teacher online consumes the global
        # generator, a cached-logit trial does not. Seeded with config.seed, the state a cached trial has always
        # had here (nothing before draws from it), so cached-logit results are what they were.
        torch.manual_seed(self.config.seed)
        self.method.bind_data(self.train.indices)
        self.method.setup(student_shapes, teacher_shapes, num_classes=self.num_classes)

    def _build_optimizer(self, index: int) -> None:
        """A fresh SGD + StepLR for stage `index` over the parameters that stage trains."""
        stage = self.stages[index]
        student = list(self.student.parameters())
        self._frozen_modules: list[nn.Module] = []
        self._stop_at: tuple[list[nn.Module], list[nn.Module]] = ([], [])
        if stage.train_up_to:
            student = self._parameters_feeding(stage.train_up_to)
            trained = {id(p) for p in student}
            # whole subtrees none of whose parameters this stage trains: kept in eval mode while it runs
            self._frozen_modules = [m for m in self.student.modules() if any(True for _ in m.parameters())
                                    and not any(id(p) in trained for p in m.parameters())]
            plan = self.links.only(stage.train_up_to)
            student_modules = dict(self.student.named_modules())
            teacher_modules = dict(self.teacher.named_modules()) if self.teacher is not None else {}
            self._stop_at = ([student_modules[name] for name in plan.student.values()],
                             [teacher_modules[name] for name in plan.teacher.values()] if teacher_modules else [])
        parameters = student + list(self.method.student_side_parameters(stage))
        self.optimizer = build_optimizer(parameters, self.config)
        self.scheduler = build_scheduler(self.optimizer, self.config)
        self.optimizer_stage = index
        self.method.use_stage(stage)

    def _parameters_feeding(self, links: tuple[str, ...]) -> list[nn.Parameter]:
        """The student parameters the features at `links` depend on, found by one backward pass.

        Asking autograd (rather than counting modules in registration order) is right for any model,
        a torchvision one included, whatever order its modules were declared in.
        """
        tap = models.FeatureTap(self.student, self.links.only(links).student)
        try:
            images, _, _ = next(self.val.batches(2))
            self.student.eval()
            self.student(images)
            parameters = [p for p in self.student.parameters() if p.requires_grad]
            total = sum(tap.features[k].float().sum() for k in links)
            grads = torch.autograd.grad(total, parameters, allow_unused=True)
        finally:
            tap.remove()
        return [p for p, g in zip(parameters, grads) if g is not None]

    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ---- training -----------------------------------------------------------------------------
    def epochs(self) -> Iterator[dict]:
        """Train the remaining epochs; yield each epoch's metrics. The last one includes test accuracy."""
        while not self.done:
            self.train_pass()
            yield self.end_epoch()

    def train_pass(self) -> None:
        """An epoch's training steps, without the evaluation that ends it (benchmarks time this alone)."""
        self.begin_epoch()
        for images, labels, indices in self.train.batches(self.config.batch_size, self.batch_generator()):
            self.train_step(images, labels, indices)

    # One epoch in three parts, so that `fused_epochs` can step several students on the same batches.
    @property
    def done(self) -> bool:
        return self.epoch >= self.total_epochs

    def batch_generator(self) -> torch.Generator:
        """The epoch's batch order and augmentation draws: a function of seed and epoch alone."""
        return torch.Generator().manual_seed(self.config.seed * 100_003 + self.epoch)

    def begin_epoch(self) -> None:
        index = self._stage_index(self.epoch)
        self._stage = self.stages[index]
        self._started = time.perf_counter()
        self.test_time_s = 0.0
        # Dropout (student, discriminator) draws from the global generator: seed it per epoch so a resumed
        # trial draws exactly what the uninterrupted one did.
        torch.manual_seed((self.config.seed * 100_003 + self.epoch) * 2 + 1)
        if self.optimizer_stage != index:
            self._build_optimizer(index)
        if self.stage_started < index:
            self.stage_metrics.update(self.method.start_stage(self._stage, self))
            self.stage_started = index
        self.method.begin_epoch(self.epoch + 1, self.total_epochs)
        self._lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trains with
        self.student.train()
        for module in self._frozen_modules:  # not trained in this stage: leave BatchNorm statistics, no dropout
            module.eval()
        self.method.train()
        self._sums: dict[str, torch.Tensor] = {}
        self._batch_sums: dict[str, torch.Tensor] = {}  # the method's per-batch metrics (not loss terms)
        self._batches = 0

    @property
    def uses_teacher_now(self) -> bool:
        return self._stage.uses_teacher

    @property
    def takes_shared_teacher(self) -> bool:
        """Whether this epoch's steps can read a teacher forward run once for several students (a TeacherPass):
        the teacher runs online (not from the cache) in this stage."""
        return self._stage.uses_teacher and self.teacher is not None and self.teacher_logits is None

    @property
    def teacher_stop_at(self) -> list[nn.Module]:
        """The teacher modules after which this stage's teacher forward may stop ([]: it runs to the logits)."""
        return self._stop_at[1]

    def train_step(self, images, labels, indices, teacher: "TeacherPass | torch.Tensor | None" = None) -> None:
        """One optimiser step on a batch. `teacher`: a teacher forward on it run once for several students
        (fused trials: a TeacherPass, or its logits alone); None: this trainer runs or looks up its own."""
        stage = self._stage
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self._forward(images, labels, indices, stage.uses_teacher, teacher)
            for name, value in self.method.before_student_step(out).items():
                self._batch_sums[name] = self._batch_sums.get(name, 0.0) + value.detach().float()
            terms = self.method.losses(out)
        if stage.terms is not None:
            terms = {name: value for name, value in terms.items() if name in stage.terms}
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.record_terms(terms)

    def record_terms(self, terms: dict[str, torch.Tensor]) -> None:
        """Count one step's weighted loss terms into the epoch's sums (end_epoch logs and checks them); a fused
        trial's batched step (kdtune/train/fusion.py) steps the student elsewhere and reports its terms here."""
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.detach().float()
        self._batches += 1

    def end_epoch(self) -> dict:
        """Check the epoch's losses, step the schedule, evaluate: the epoch's metrics (raises TrainingDiverged)."""
        term_means, batch_means = self._epoch_means()
        self.scheduler.step()
        self.epoch += 1
        val_acc, val_loss = self.evaluate(self.val)
        epoch_time = time.perf_counter() - self._started
        self.training_time_s += epoch_time
        if val_acc > self.best_val_acc:
            self.best_val_acc, self.best_epoch = val_acc, self.epoch
            self.best_state = copy.deepcopy(self.student.state_dict())
        metrics = {
            "epoch": self.epoch,
            "epochs_total": self.total_epochs,
            "stage": self._stage.name,
            "val_acc": val_acc,
            "val_loss": val_loss,
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "train_loss": sum(term_means.values()),
            "lr": self._lr,
            "epoch_time_s": epoch_time,
            "training_time_s": self.training_time_s,
            **{f"loss_{name}": value for name, value in term_means.items()},
            **batch_means,
            **self.stage_metrics,
        }
        if self.epoch == self.total_epochs:  # after the epoch's clock: its time is not training time
            started = time.perf_counter()
            metrics.update(self.final_test_metrics())
            self.test_time_s = time.perf_counter() - started
        return metrics

    def take_epoch_share(self, metrics: dict, seconds: float, members: int) -> None:
        """Count `seconds`, this trainer's share of a fused epoch's wall time (kdtune/train/fusion.py: the epoch's time
        split among the `members` that trained in it), as the epoch's training time instead of the time between
        its own begin_epoch and end_epoch; `metrics` (what end_epoch returned) says so."""
        self.training_time_s += seconds - metrics["epoch_time_s"]
        metrics.update(epoch_time_s=seconds, training_time_s=self.training_time_s, fused_members=members)

    def _stage_index(self, epoch: int) -> int:
        for index, stage in enumerate(self.stages):
            if epoch < stage.epochs:
                return index
            epoch -= stage.epochs
        return len(self.stages) - 1

    def _epoch_means(self) -> tuple[dict[str, float], dict[str, float]]:
        # One device sync per epoch, not per step; a NaN anywhere in the epoch shows in its sum.
        batches = max(1, self._batches)
        means = {name: float(total) / batches for name, total in self._sums.items()}
        batch_means = {name: float(total) / batches for name, total in self._batch_sums.items()}
        bad = [name for name, value in {**means, **batch_means}.items() if not math.isfinite(value)]
        if bad:
            value = means.get(bad[0], batch_means.get(bad[0]))
            what = "loss term" if bad[0] in means else "metric"
            raise TrainingDiverged(
                f"{what} {bad[0]!r} became {value} in epoch {self.epoch + 1} "
                f"(lr={self.config.lr}); the trial is stopped"
            )
        return means, batch_means

    def _forward(self, images, labels, indices, uses_teacher: bool = True,
                 teacher: "TeacherPass | torch.Tensor | None" = None) -> Outputs:
        student_logits = run_until(self.student, images, self._stop_at[0])
        out = Outputs(labels=labels, indices=indices, student_logits=student_logits,
                      student_features=dict(self._student_tap.features))
        if uses_teacher and isinstance(teacher, TeacherPass):
            # this trainer's hooks on the shared teacher caught the features it links to during that forward
            out.teacher_features = teacher.features(self._teacher_tap) if self._teacher_tap is not None else {}
            out.teacher_logits = self.method.teacher_view(teacher.logits)
        elif uses_teacher and teacher is not None:
            out.teacher_logits = self.method.teacher_view(teacher)
        elif uses_teacher:
            logits, out.teacher_features = self._teacher_outputs(images, indices, self._stop_at[1])
            out.teacher_logits = self.method.teacher_view(logits)  # an ensemble's members -> its target
        return out

    def _teacher_outputs(self, images, indices, stop_at=()) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        if self.teacher_logits is not None:  # (N, C), or an ensemble's (members, N, C): rows by sample index
            return self.teacher_logits[..., indices, :], {}
        if self.teacher is None:
            return None, {}
        with torch.inference_mode():
            logits = run_until(self.teacher, images, stop_at)
        # inference tensors cannot enter autograd; clone to normal tensors (cheap, no grad needed)
        return (None if logits is None else logits.clone(),
                {k: v.clone() for k, v in self._teacher_tap.features.items()})

    @torch.no_grad()
    def collect_logits(self, split: DeviceData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student logits, teacher logits, labels) over a whole split, student in eval mode.

        For a method's one-off fits at a stage start (seed 004's discriminator); the next epoch puts the
        student back in training mode.
        """
        self.student.eval()
        student, teacher, labels = [], [], []
        for images, batch_labels, indices in split.batches(max(256, self.config.batch_size)):
            with self._autocast():
                student.append(self.student(images).float())
                teacher.append(self.method.teacher_view(self._teacher_outputs(images, indices)[0]).float())
            labels.append(batch_labels)
        return torch.cat(student), torch.cat(teacher), torch.cat(labels)

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, split: DeviceData, model: nn.Module | None = None) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of the student (or `model`) on a split."""
        return evaluate(model or self.student, split, max(256, self.config.batch_size), self.device, self._autocast)

    def final_test_metrics(self) -> dict:
        test_acc, test_loss = self.evaluate(self.test)
        metrics = {"test_acc": test_acc, "test_loss": test_loss}
        if self.best_state is not None:
            current = copy.deepcopy(self.student.state_dict())
            self.student.load_state_dict(self.best_state)
            metrics["test_acc_at_best_val"] = self.evaluate(self.test)[0]
            self.student.load_state_dict(current)
        return metrics

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "student": self.student.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_val_acc": self.best_val_acc,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "training_time_s": self.training_time_s,
            "optimizer_stage": self.optimizer_stage,
            "stage_started": self.stage_started,
            "stage_metrics": self.stage_metrics,
        }

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])
        # The saved optimiser belongs to the stage that was running; a later stage starts its own.
        self._build_optimizer(state.get("optimizer_stage", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]
        self.best_val_acc = state["best_val_acc"]
        self.best_epoch = state["best_epoch"]
        self.best_state = state["best_state"]
        self.training_time_s = state["training_time_s"]
        self.stage_started = state.get("stage_started", self._stage_index(max(self.epoch - 1, 0)))
        self.stage_metrics = dict(state.get("stage_metrics", {}))

    def close(self) -> None:
        self._student_tap.remove()
        if self._teacher_tap is not None:
            self._teacher_tap.remove()
        self._restore_backends()
        self._restore_backends = lambda: None
