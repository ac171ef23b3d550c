"""Logit-bridge distillation with transformers models: a plain loop and the Trainer."""

import copy

import pytest
import torch

import fastprobe as fp
from fastprobe.methods.distillation import distillation_loss, next_token_targets, trainer_compute_loss

transformers = pytest.importorskip("transformers")


def tiny_gpt2(vocab_size=101, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


def batch(vocab_size=101):
    input_ids = torch.randint(0, vocab_size, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 6:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_next_token_targets_shift_and_padding():
    labels = torch.tensor([[5, 6, 7, -100]])
    targets = next_token_targets(labels, None, torch.Size([1, 4]), -100, torch.device("cpu"))
    assert targets.tolist() == [[6, 7, -100, -100]]
    mask = torch.tensor([[1, 1, 0, 0]])
    assert next_token_targets(None, mask, torch.Size([1, 4]), -100, torch.device("cpu")).tolist() == [[0, -100, -100, -100]]


def test_next_token_targets_left_padding_scores_no_pad_position():
    """Row 0 is left-padded by two: its last pad (position 1) must not be scored on the first
    real token, with or without labels."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [3, 4, 5, 6, 7]])
    shape, cpu = torch.Size([2, 5]), torch.device("cpu")
    assert next_token_targets(labels, mask, shape, -100, cpu).tolist() == [[-100, -100, 8, 9, -100], [4, 5, 6, 7, -100]]
    assert next_token_targets(None, mask, shape, -100, cpu).tolist() == [[-100, -100, 0, 0, -100], [0, 0, 0, 0, -100]]


def test_beta_zero_distillation_is_forward_kl_on_next_tokens():
    student, teacher = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    inputs = batch()
    loss, _ = distillation_loss(student, teacher, inputs, fp.BridgeLoss(beta=0.0))
    s_logits = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    t_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    keep = inputs["labels"][:, 1:] != -100
    per_position = torch.nn.functional.kl_div(torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1),
                                              log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(loss, per_position[keep].mean(), rtol=1e-5, atol=1e-6)


def test_plain_training_loop_reduces_the_loss_and_pads_vocabularies():
    """A teacher whose vocabulary has 7 padding rows more; beta = 0.5 throughout."""
    student, teacher = tiny_gpt2(vocab_size=101, seed=0).train(), tiny_gpt2(vocab_size=108, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)  # a sharper teacher: something to learn
    inputs = batch()
    loss_fn = fp.BridgeLoss(beta=0.5)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, _ = distillation_loss(student, teacher, inputs, loss_fn)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def test_trainer_compute_loss(tmp_path):
    pytest.importorskip("accelerate")
    student, teacher = tiny_gpt2(seed=0).train(), tiny_gpt2(seed=1)
    steps_seen = []

    class RecordingLoss(fp.BridgeLoss):
        def forward(self, *args, step=None, **kwargs):
            steps_seen.append(step)
            return super().forward(*args, step=step, **kwargs)

    class DistillationTrainer(transformers.Trainer):
        compute_loss = trainer_compute_loss(teacher, RecordingLoss(beta_start=0.0, beta_end=1.0, total_steps=3))

    examples = [{name: value[i] for name, value in batch().items()} for i in range(3)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=1, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    before = student.lm_head.weight.detach().clone()
    result = DistillationTrainer(model=student, args=args, train_dataset=examples).train()
    assert steps_seen == [0, 1, 2]
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, student.lm_head.weight.detach())


def test_trainer_gradient_accumulation_takes_the_mean_of_micro_batches(tmp_path):
    """One SGD step on two equal-length examples: batch 1 with 2 accumulation steps updates as
    batch 2 without accumulation does, and as a plain loop on the two losses' mean (the Trainer
    does not divide by the steps itself for a model that accepts loss kwargs)."""
    pytest.importorskip("accelerate")
    teacher, base = tiny_gpt2(seed=1), tiny_gpt2(seed=0).train()
    data = batch()
    examples = [{name: value[i] for name, value in data.items()} for i in (1, 2)]  # (unpadded: equal token counts)

    def update(batch_size, accumulation):
        student = copy.deepcopy(base)

        class DistillationTrainer(transformers.Trainer):
            compute_loss = trainer_compute_loss(teacher, fp.BridgeLoss(beta=0.5))

        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
            max_grad_norm=0.0, weight_decay=0.0, report_to=[], save_strategy="no", logging_strategy="no",
            use_cpu=True, disable_tqdm=True)
        DistillationTrainer(model=student, args=args, train_dataset=examples).train()
        return student.lm_head.weight.detach() - base.lm_head.weight.detach()

    student = copy.deepcopy(base)
    loss_fn = fp.BridgeLoss(beta=0.5)
    losses = [distillation_loss(student, teacher, {k: v[None] for k, v in e.items()}, loss_fn)[0] for e in examples]
    (sum(losses) / 2).backward()
    want = -student.lm_head.weight.grad
    for batch_size, accumulation in ((2, 1), (1, 2)):
        torch.testing.assert_close(update(batch_size, accumulation), want, rtol=1e-4, atol=1e-6)
