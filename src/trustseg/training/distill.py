"""Knowledge distillation for segmentation: the student's per-pixel class distribution is pulled towards
a teacher's (Hinton, Vinyals & Dean 2015), e.g. a pruned model fine-tuned with the unpruned model as its
teacher, as NViT (Yang et al., CVPR 2023) fine-tunes with a KL term to the dense model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustseg.engine.checkpoint import load_checkpoint
from trustseg.engine.inference import model_from_checkpoint
from trustseg.errors import UserError


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T**2 * mean over pixels of KL(softmax(teacher / T) || softmax(student / T))``.

    Logits (B, K, H, W) each -> scalar. Every pixel counts, ignore-labelled ones too (the teacher has an
    answer there as well). The T**2 factor keeps the gradient's size independent of T (Hinton et al.).
    The teacher receives no gradient.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)  # (B, H, W)
    return kl.mean() * temperature**2


def load_teacher(path: str, *, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device) -> nn.Module:
    """The frozen model of checkpoint `path` in eval mode on `device`; it must predict the run's
    `num_classes` classes from images normalised like the run's (`mean`, `std`)."""
    checkpoint = load_checkpoint(path)
    if checkpoint.classes.num_classes != num_classes:
        raise UserError(f"distill.teacher {path} predicts {checkpoint.classes.num_classes} classes, "
                        f"the trained model {num_classes}")
    if tuple(checkpoint.mean) != tuple(mean) or tuple(checkpoint.std) != tuple(std):
        raise UserError(f"distill.teacher {path} expects images normalised with mean {list(checkpoint.mean)}, "
                        f"std {list(checkpoint.std)}; set data.mean and data.std to them")
    return model_from_checkpoint(checkpoint).to(device).eval().requires_grad_(False)
