"""Seed 001's CNN family (§3): a VGG-style teacher, a 2-block and a 1-block CNN student, and a dense student.

The paper gives layer counts and parameter totals, not widths; the widths below are chosen so the totals land
on the paper's figures for CIFAR-10 (32x32x3 input, 10 classes). All convs are 3x3 with padding 1, every
block ends in a 2x2 max-pool, and a "dense layer" is a hidden ReLU layer before the softmax classifier.
  teacher (11 conv, 4 max-pool, 3 dense): [64,64] [128,128] [256,256,256] [512,512,512,512], FC-768 FC-768 FC-10
      12,166,986 parameters ("around 12 million")
  2-block student: [32] [64], FC-56 FC-10        249,394 parameters ("around 250 thousand"; also the teacher assistant of §3.2)
  1-block student: [16], FC-32 FC-10             131,882 parameters ("totalling 130k")
  dense student (§3.3): 3072 -> 80 -> 80 -> 10   253,130 parameters, the 2-block student's budget without convolutions
    (the paper tried "many different" dense networks and names none).

Link numbers mean the same place in every model of the family, so any pair shares them:
  link k (1..4) = output of conv block k (after ReLU, before its pool): 32x32, 16x16, 8x8, 4x4 for a 32x32 input,
                  equal spatial size in teacher and students, as the hint/guided layer of §2.4 needs
  link 5        = the last hidden dense layer (after ReLU)
"""
from __future__ import annotations

TEACHER_STAGES = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512, 512]]
TEACHER_HIDDEN = [768, 768]
STUDENT2_STAGES, STUDENT2_HIDDEN = [[32], [64]], [56]
STUDENT1_STAGES, STUDENT1_HIDDEN = [[16]], [32]
DENSE_HIDDEN = [80, 80]

DENSE_LINK = 5


def cnn_link_points(num_stages: int, num_hidden: int) -> dict[int, str]:
    """Module names of the VGG class (blockK, fcK) under this family's numbering."""
    points = {k: f"block{k}" for k in range(1, num_stages + 1)}
    points[DENSE_LINK] = f"fc{num_hidden}"
    return points
