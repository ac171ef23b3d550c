"""Logit-bridge distillation of a causal language model, in a plain training loop or
with the transformers Trainer.

    loss_fn = fastprobe.BridgeLoss(beta_start=0.0, beta_end=1.0, total_steps=num_steps - 1)
    # (steps 0 .. num_steps - 1: beta_end at the last; beta_schedule holds it past total_steps)

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

from ..ops.bridge import FusedLinearBridgeLoss
from . import _batching
from ._batching import eval_mode, forward_parameters

__all__ = ["check_labels", "distillation_loss", "next_token_targets", "shared_vocabulary", "trainer_compute_loss"]


def next_token_targets(labels: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                       shape: torch.Size, ignore_index: int, device: torch.device) -> torch.Tensor:
    """For logits [B, L, V], the label each position predicts ([B, L] int64 on `device`; shape is
    the logits' [B, L]): the next position's label (causal LMs' shift), ignore_index at the last
    position; without labels, a marker other than ignore_index. With an attention mask, a
    position is scored only when it and the next one are real tokens, with or without labels: a
    label under padding (labels copied from input_ids) is no target (right padding would score a
    text's last real token, which the text alone never has), and a padding position predicts
    nothing (with left padding, the last pad would be scored on the first real token). Keeping
    all L positions (rather than slicing the logits to L - 1) lets the loss read the logits
    without copying them."""
    targets = torch.full(shape, ignore_index, dtype=torch.long, device=device)
    scored = 1 if ignore_index == 0 else 0  # (the loss reads the targets only as scored or not)
    targets[:, :-1] = labels[:, 1:] if labels is not None else scored
    if attention_mask is not None:
        # position i predicts token i + 1: a prediction needs a real input and a real target
        real = attention_mask.to(device) != 0
        targets[:, :-1].masked_fill_(~real[:, 1:], ignore_index)
        targets.masked_fill_(~real, ignore_index)
    return targets


def check_labels(labels: Optional[torch.Tensor], ignore_index: int) -> None:
    """labels hold token ids (>= 0) or ignore_index: any other negative value (HF's -100 with
    another ignore_index) is refused, as scoring those positions is never meant. (One host
    synchronisation per batch.)"""
    if labels is None:
        return
    unknown = labels[(labels < 0) & (labels != ignore_index)]
    if unknown.numel() > 0:
        raise ValueError(
            f"labels hold {unknown[0].item()}, which is neither a token id nor loss_fn's ignore_index "
            f"({ignore_index}); mark the positions to ignore with ignore_index, or give loss_fn that "
            f"ignore_index (e.g. BridgeLoss(ignore_index={unknown[0].item()}))"
        )


def shared_vocabulary(student_size: int, teacher_size: int, tokenizer=None) -> int:
    """The logits' entries the loss compares, the first min(student_size, teacher_size): sizes
    may differ only by padding rows (an embedding matrix rounded up, e.g. to a multiple of 64),
    entries at or beyond len(tokenizer), which no token id reaches. Without a tokenizer nothing
    tells padding from another tokenizer's vocabulary, so other sizes are refused; a tokenizer
    with more tokens than either model has entries is refused too."""
    if tokenizer is not None:
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # (a processor's tokenizer)
        return _batching.shared_vocabulary([student_size, teacher_size], tokenizer, "logits: student, teacher",
                                           "student and teacher")
    if student_size != teacher_size:
        raise ValueError(
            f"student logits have {student_size} vocabulary entries, teacher logits {teacher_size}; pass "
            "tokenizer= (the tokenizer both models use; with the Trainer, its processing_class serves) to "
            f"compare them on the first {min(student_size, teacher_size)}, allowed when the extra entries "
            "are padding beyond len(tokenizer)"
        )
    return student_size


def _check_loss_fn(loss_fn) -> None:
    """loss_fn compares logits (a BridgeLoss): a FusedLinearBridgeLoss, which takes hidden states and
    LM-head weights, is refused by name (it failed after both models ran, on missing arguments)."""
    if isinstance(loss_fn, FusedLinearBridgeLoss):
        raise TypeError(
            "loss_fn is a FusedLinearBridgeLoss, which takes hidden states and LM-head weights; distillation "
            "compares the models' logits here: give a BridgeLoss with the same options, or call the "
            "FusedLinearBridgeLoss in your own loop on the last hidden states and get_output_embeddings().weight"
        )


def distillation_loss(student, teacher, inputs: Mapping[str, torch.Tensor], loss_fn, step: Optional[int] = None,
                      *, tokenizer=None):
    """(loss, student outputs) for one batch: both models run on the inputs (the teacher
    without gradient), and loss_fn (a BridgeLoss) compares their next-token distributions
    on the non-ignored positions. inputs["labels"], if any, holds token ids or
    loss_fn.ignore_index (check_labels). Vocabularies that differ only by padding rows beyond
    the tokenizer's tokens (e.g. 32000 vs 32064) are compared on the shared first V entries;
    that takes the tokenizer both models use (shared_vocabulary). A teacher on another device
    (a second GPU, or the CPU) or in another dtype gets the inputs there, floating ones (pixel
    values) in its dtype, and hands its logits back, moved to the student's device but kept in
    their dtype (the loss reads mixed dtypes as they are, see fastprobe.bridge_loss). The
    teacher runs in eval mode (no dropout: a fixed target), each of its modules' training flags
    restored afterwards; the student runs as it is (train mode for training). Both models get
    position_ids counted over each row's real tokens, in its own numbering (RoBERTa's from 2), when
    the inputs have an attention mask and no position_ids (without them most models number a
    left-padded row from its first pad: learned absolute positions, GPT-2's, then gave a text a
    loss that depended on its batch's padding)."""
    _check_loss_fn(loss_fn)
    labels = inputs.get("labels")
    check_labels(labels, loss_fn.ignore_index)
    ids = inputs.get("input_ids")
    tokens = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if isinstance(tokens, torch.Tensor) and tokens.dim() > 0 and tokens.shape[0] == 0:  # (it failed inside a model)
        raise ValueError("inputs hold no rows (batch size 0): there is nothing to distil")
    if labels is not None and isinstance(ids, torch.Tensor) and labels.shape != ids.shape:  # (before either model runs)
        raise ValueError(f"labels must have input_ids' shape {list(ids.shape)} (a label per token), got "
                         f"{list(labels.shape)}")
    if tokenizer is not None:  # (before either model runs: a table smaller than the tokenizer fails inside it)
        _batching.check_input_embeddings([student, teacher], getattr(tokenizer, "tokenizer", tokenizer),
                                         "input embedding rows: student, teacher", "student and teacher")
    model_inputs = {name: value for name, value in inputs.items() if name != "labels"}
    student_outputs = student(**_batching.with_positions(student, model_inputs))
    teacher_inputs = _batching.on_model(teacher, model_inputs)  # (ids and masks keep their dtype)
    if "use_cache" not in teacher_inputs and "use_cache" in forward_parameters(teacher):
        teacher_inputs["use_cache"] = False  # (one pass: no KV cache of every layer held at its peak)
    with torch.no_grad(), eval_mode(teacher):
        teacher_logits = teacher(**teacher_inputs).logits
    student_logits = student_outputs.logits
    vocab = shared_vocabulary(student_logits.shape[-1], teacher_logits.shape[-1], tokenizer)
    targets = next_token_targets(labels, inputs.get("attention_mask"), student_logits.shape[:2],
                                 loss_fn.ignore_index, student_logits.device)
    # (on the student's device; in the teacher's own dtype, which bridge_loss reads as it is: no
    # [B, L, V] copy in the student's dtype)
    teacher_logits = teacher_logits[..., :vocab].to(student_logits.device)
    loss = loss_fn(student_logits[..., :vocab], teacher_logits, labels=targets, step=step)
    return loss, student_outputs


def trainer_compute_loss(teacher, loss_fn, *, tokenizer=None):
    """A compute_loss method for a transformers.Trainer subclass that distils `teacher`
    into the trained model with loss_fn; the beta schedule follows trainer.state.global_step.
    tokenizer (default: the Trainer's processing_class) tells vocabulary padding rows apart
    (distillation_loss). With gradient accumulation, each micro-batch's loss counts
    1 / (accumulation steps): the update is the one of the micro-batches' mean loss, as without
    accumulation on equal-sized micro-batches. Evaluation (the model in eval mode) reports the loss
    undivided."""
    _check_loss_fn(loss_fn)

    def compute_loss(trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
        shared_tokenizer = tokenizer if tokenizer is not None else getattr(trainer, "processing_class", None)
        loss, outputs = distillation_loss(model, teacher, inputs, loss_fn, step=trainer.state.global_step,
                                          tokenizer=shared_tokenizer)
        if model.training and not _trainer_divides_by_accumulation(trainer, num_items_in_batch):
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
