"""Logit-bridge distillation of a causal language model, in a plain training loop or
with the transformers Trainer.

    loss_fn = fastprobe.BridgeLoss(beta_start=0.0, beta_end=1.0, total_steps=num_steps)

    # a plain loop
    loss, _ = distillation_loss(student, teacher, batch, loss_fn, step=step)
    loss.backward()

    # the transformers Trainer
    class DistillationTrainer(transformers.Trainer):
        compute_loss = trainer_compute_loss(teacher, loss_fn)
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

__all__ = ["distillation_loss", "next_token_targets", "trainer_compute_loss"]


def next_token_targets(labels: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                       shape: torch.Size, ignore_index: int, device: torch.device) -> torch.Tensor:
    """For logits [B, L, V], the label each position predicts: the next position's label
    (causal LMs' shift), ignore_index at the last position. Without labels, a next position
    that the attention mask marks as padding is ignored; with or without labels, so is every
    padding position itself (with left padding, the last pad would otherwise be scored on the
    first real token). Keeping all L positions (rather than slicing the logits to L - 1) lets
    the loss read the logits without copying them."""
    targets = torch.full(shape, ignore_index, dtype=torch.long, device=device)
    if labels is not None:
        targets[:, :-1] = labels[:, 1:]
    elif attention_mask is not None:
        targets[:, :-1] = torch.where(attention_mask[:, 1:] == 0, ignore_index, 0)
    else:
        targets[:, :-1] = 0
    if attention_mask is not None:
        targets.masked_fill_(attention_mask.to(device) == 0, ignore_index)
    return targets


def distillation_loss(student, teacher, inputs: Mapping[str, torch.Tensor], loss_fn, step: Optional[int] = None):
    """(loss, student outputs) for one batch: both models run on the inputs (the teacher
    without gradient), and loss_fn (a BridgeLoss) compares their next-token distributions
    on the non-ignored positions. Vocabularies that differ only by padding rows (e.g.
    32000 vs 32064) are compared on the shared first V entries. A teacher on another device
    (a second GPU, or the CPU) gets the inputs there and hands its logits back."""
    labels = inputs.get("labels")
    model_inputs = {name: value for name, value in inputs.items() if name != "labels"}
    student_outputs = student(**model_inputs)
    teacher_device = next(teacher.parameters()).device
    with torch.no_grad():
        teacher_logits = teacher(**{name: value.to(teacher_device) if isinstance(value, torch.Tensor) else value
                                    for name, value in model_inputs.items()}).logits
    student_logits = student_outputs.logits
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    targets = next_token_targets(labels, inputs.get("attention_mask"), student_logits.shape[:2],
                                 loss_fn.ignore_index, student_logits.device)
    teacher_logits = teacher_logits[..., :vocab].to(student_logits.device, student_logits.dtype)
    loss = loss_fn(student_logits[..., :vocab], teacher_logits, labels=targets, step=step)
    return loss, student_outputs


def trainer_compute_loss(teacher, loss_fn):
    """A compute_loss method for a transformers.Trainer subclass that distils `teacher`
    into the trained model with loss_fn; the beta schedule follows trainer.state.global_step.
    With gradient accumulation, each micro-batch's loss counts 1 / (accumulation steps): the
    update is the one of the micro-batches' mean loss, as without accumulation on equal-sized
    micro-batches."""

    def compute_loss(trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = distillation_loss(model, teacher, inputs, loss_fn, step=trainer.state.global_step)
        if not _trainer_divides_by_accumulation(trainer, num_items_in_batch):
            loss = loss / getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)
        return (loss, outputs) if return_outputs else loss

    return compute_loss


def _trainer_divides_by_accumulation(trainer, num_items_in_batch) -> bool:
    """Whether the Trainer divides compute_loss's loss by the accumulation steps itself. It does
    not when it takes that loss to be normalised by num_items_in_batch already (a model that
    accepts loss kwargs, or a compute_loss_func), which this loss (a mean per micro-batch) is not;
    transformers 5 lets a Trainer say so in loss_is_scaled_for_ga."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or \
            getattr(trainer, "compute_loss_func", None) is not None
    return not scaled
