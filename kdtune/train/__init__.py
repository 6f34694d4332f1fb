"""The training layer: PyTorch code that trains and evaluates students, and never touches Ray Tune or MLflow.

    trainer.py        Trainer: the one training loop (stages, steps, epochs, checkpoint state)
    recipe.py         what a TrialConfig's recipe builds: optimiser, LR schedule, training augmentation
    forward.py        partial forwards (run_until) and the shared teacher forward of fused students (TeacherPass)
    evaluation.py     accuracy and mean cross-entropy of a model on a split
    teacher_logits.py the teacher's logits on every training sample (the logit cache)
    devices.py        the device a trial trains on, channels_last, native bf16
    backends.py       determinism / cudnn settings per open Trainer, restored when a trial ends
    linking.py        links -> module paths, probed on real models
    parts.py          StudyParts: what every trial receives, and the Trainers built from it
    fusion.py         fused students: groups, the shared-batch loop
    batched.py        K students stepped as one vmap computation

Nothing here imports kdtune.tracking, Ray Tune or the study-level modules (study, resolve, trial, ...): those
import this package. Import each module by its path (kdtune.train.trainer, ...); this file re-exports nothing.
"""
