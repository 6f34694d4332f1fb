"""Per-dataset defaults: which teacher and student, and the training recipe for each.

CIFAR follows seed 000 Table 2 (SGD momentum 0.9, weight decay 2e-5, lr 0.004 x0.1 every 10 epochs,
batch 40, 25 epochs) for both networks. The 8x8 digits pair trains in seconds; measured over 3 seeds here:
at lr 0.004 the baseline student reaches only ~48% in 25 epochs; at lr 0.01 / 15 epochs it reaches 92.3% and
KD (alpha 0.5) 95.5% at T=2, 97.2% at T=5; at lr 0.03 the baseline reaches 97.4% but KD at T >= 5 diverges
(the T^2 factor multiplies the soft term's step). Every value can be overridden from a study's options.

The other datasets take their networks from the seed papers that use them; the papers give few training
settings, so where one is silent the recipe is a common SGD setting for that network, with the step decay
falling inside the epoch budget:
  mnist, notmnist, svhn, svhn28   seed 004's MLP pairs (§4); seed 004 gives no recipe: SGD lr 0.01, batch 128
  fashion_mnist                   seed 001's CNN pair (teacher with BatchNorm: the plain 11-conv stack trains
                                  poorly from scratch); seed 001 names only SGD with Nesterov momentum
  imagenet32                      seed 003's WRN-40-10 / WRN-22-4 with Chrabaszcz et al.'s ImageNet32 budget
                                  (SGD lr 0.01, weight decay 5e-4, batch 128, 40 epochs, lr x0.2 every 10)

Every other dataset (folder:, npz:, module:function, a Dataset object) gets its recipe by one rule
(`rule_recipe`), the same for teacher and student, every value overridable:
  networks   image samples (C, H, W) with H, W >= 8: the small VGG pair sized for digits (3 conv stages,
             links 1-4; `digits_teacher` / `digits_student`), which adapts its classifier to any input size;
             any other shape (vectors, signals): an MLP pair on the flattened sample (`mlp_teacher` 2 x 512 /
             `mlp_student` 1 x 64)
  optimiser  SGD, momentum 0.9, weight decay 5e-4, lr 0.01 (the MLP_SGD setting above)
  batch      128, or 32 below 2,000 training samples (so that an epoch still has dozens of steps)
  epochs     30 below 10,000 training samples, 20 below 100,000, else 10; the lr falls x0.1 at 2/3 of them
  teacher    the same, with twice the epochs (it is trained once and reused by every study)
"""
from __future__ import annotations

from kdtune.errors import ConfigError

SEED000_TABLE2 = {"lr": 0.004, "momentum": 0.9, "weight_decay": 2e-5, "lr_step_epochs": 10, "lr_gamma": 0.1,
                  "batch_size": 40, "epochs": 25}

MLP_SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "lr_step_epochs": 10, "lr_gamma": 0.1,
           "batch_size": 128, "epochs": 20}
CNN_SGD = {**MLP_SGD, "weight_decay": 5e-4}
IMAGENET32_WRN = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "lr_step_epochs": 10, "lr_gamma": 0.2,
                  "batch_size": 128, "epochs": 40}


def _pair(teacher: str, student: str, recipe: dict) -> dict:
    return {"teacher": teacher, "student": student, "student_recipe": dict(recipe), "teacher_recipe": dict(recipe)}


RECIPES: dict[str, dict] = {
    "digits": {
        "teacher": "digits_teacher",
        "student": "digits_student",
        "student_recipe": {**SEED000_TABLE2, "lr": 0.01, "epochs": 15},
        "teacher_recipe": {**SEED000_TABLE2, "lr": 0.05, "epochs": 30, "lr_step_epochs": 15},
    },
    "cifar10": {"teacher": "vgg16", "student": "vgg7",
                "student_recipe": dict(SEED000_TABLE2), "teacher_recipe": dict(SEED000_TABLE2)},
    "cifar100": {"teacher": "vgg16", "student": "vgg7",
                 "student_recipe": dict(SEED000_TABLE2), "teacher_recipe": dict(SEED000_TABLE2)},
    "mnist": _pair("mlp_2x1200", "mlp_2x800", MLP_SGD),
    "notmnist": _pair("mlp_3x1200", "mlp_3x800", MLP_SGD),
    "svhn": _pair("mlp_2x4096", "mlp_2x3072", MLP_SGD),
    "svhn28": _pair("mlp_2x4096", "mlp_2x3072", MLP_SGD),
    "fashion_mnist": _pair("cnn11_bn", "cnn2", CNN_SGD),
    "imagenet32": _pair("wrn_40_10", "wrn_22_4", IMAGENET32_WRN),
}


def recipe_for(dataset, builtin: bool = True) -> dict:
    """The recipe of a built-in dataset (by name, or a loaded built-in Dataset), else `rule_recipe`'s."""
    name = dataset if isinstance(dataset, str) else dataset.name
    if isinstance(dataset, str):
        from kdtune.data import dataset_info

        dataset_info(dataset)  # an unknown dataset gets the same message everywhere
        if dataset not in RECIPES:
            raise ConfigError(f"dataset={dataset!r}: no recipe; allowed: {', '.join(sorted(RECIPES))}")
    if builtin and name in RECIPES:
        return RECIPES[name]
    return rule_recipe(dataset.num_train, tuple(dataset.input_shape))


def rule_recipe(num_train: int, sample_shape: tuple[int, ...]) -> dict:
    """The documented default for a dataset kdtune does not ship (see the module docstring)."""
    images = len(sample_shape) == 3 and min(sample_shape[1:]) >= 8
    teacher, student = ("digits_teacher", "digits_student") if images else ("mlp_teacher", "mlp_student")
    epochs = 30 if num_train < 10_000 else 20 if num_train < 100_000 else 10
    student_recipe = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 32 if num_train < 2000 else 128,
                      "epochs": epochs, "lr_step_epochs": max(1, round(2 * epochs / 3)), "lr_gamma": 0.1}
    teacher_recipe = {**student_recipe, "epochs": 2 * epochs, "lr_step_epochs": max(1, round(4 * epochs / 3))}
    return {"teacher": teacher, "student": student, "student_recipe": student_recipe,
            "teacher_recipe": teacher_recipe}
