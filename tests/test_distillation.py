"""Logit-bridge distillation with transformers models: a plain loop and the Trainer."""

import copy
from types import SimpleNamespace

import pytest
import torch

import fastprobe as fp
from fastprobe.methods.distillation import distillation_loss, next_token_targets, trainer_compute_loss
from fastprobe.models import tiny_tokenizer

from .dropout_helpers import check_eval_mode, training_flags, with_dropout

transformers = pytest.importorskip("transformers")


def tiny_gpt2(vocab_size=101, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


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


def test_next_token_targets_right_padding_labels_under_padding_are_no_targets():
    """labels = input_ids, padding not marked: the label under a pad is no target, so the last
    real token (whose next position is a pad) is not scored, as without labels."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[3, 4, 5, 0, 0], [3, 4, 5, 6, 7]])
    shape, cpu = torch.Size([2, 5]), torch.device("cpu")
    assert next_token_targets(labels, mask, shape, -100, cpu).tolist() == [[4, 5, -100, -100, -100], [4, 5, 6, 7, -100]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_labels_equal_to_input_ids_score_as_without_labels(tokenizer, side):
    """Labels copied from input_ids (padding not marked -100) give the loss of no labels on either
    padding side. Right padding scored each padded text's last real token on the pad after it:
    one row per padded text that the text alone (or left padded) never has (0.4% off here)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = side
    student, teacher = tiny_gpt2(len(tokenizer), seed=0), tiny_gpt2(len(tokenizer), seed=1)
    texts = ["The river ran past the old mill.", "Short.", "A small model can still show where attention goes."]
    inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    loss_fn = fp.BridgeLoss(beta=0.5)
    without, _ = distillation_loss(student, teacher, inputs, loss_fn)
    copied, _ = distillation_loss(student, teacher, dict(inputs, labels=inputs["input_ids"].clone()), loss_fn)
    torch.testing.assert_close(copied, without, rtol=1e-6, atol=0)


@pytest.mark.parametrize("beta, direction", [(0.0, "forward"), (0.7, "reverse")])
def test_a_left_padded_text_scores_as_alone(beta, direction):
    """GPT-2's learned positions: a left-padded row numbered from its first pad (no position_ids
    given) put its tokens at other positions than alone, and its loss differed by ~1e-3."""
    student, teacher = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    torch.manual_seed(3)
    texts = [torch.randint(1, 101, (length,)) for length in (9, 5, 7)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, text in enumerate(texts):  # left padding
        ids[row, 9 - len(text):], mask[row, 9 - len(text):] = text, 1
    loss_fn = fp.BridgeLoss(beta=beta, direction=direction, reduction="sum")
    batched, _ = distillation_loss(student, teacher, {"input_ids": ids, "attention_mask": mask}, loss_fn)
    alone = [distillation_loss(student, teacher, {"input_ids": text[None], "attention_mask": torch.ones(1, len(text),
                                                  dtype=torch.long)}, loss_fn)[0] for text in texts]
    torch.testing.assert_close(batched, sum(alone), rtol=2e-6, atol=1e-6)


def test_plain_training_loop_reduces_the_loss_and_pads_vocabularies(tokenizer):
    """A teacher whose vocabulary has 7 padding rows more (beyond the tokenizer's); beta = 0.5 throughout."""
    student = tiny_gpt2(vocab_size=len(tokenizer), seed=0).train()
    teacher = tiny_gpt2(vocab_size=len(tokenizer) + 7, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)  # a sharper teacher: something to learn
    inputs = batch(len(tokenizer))
    loss_fn = fp.BridgeLoss(beta=0.5)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, _ = distillation_loss(student, teacher, inputs, loss_fn, tokenizer=tokenizer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def teacher_forced_loss(student, teacher, inputs, vocab, **options):
    """bridge_loss of the two models' logits cut to the first `vocab` entries, on the positions
    whose next label is kept."""
    model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    s_logits, t_logits = student(**model_inputs).logits[:, :-1, :vocab], teacher(**model_inputs).logits[:, :-1, :vocab]
    keep = inputs["labels"][:, 1:] != -100
    return fp.bridge_loss(s_logits[keep], t_logits[keep], **options)


@pytest.mark.parametrize("padded", ["teacher", "student"])
def test_vocabularies_padded_beyond_the_tokenizer_compare_the_shared_tokens(tokenizer, padded):
    """Either model's vocabulary padded beyond the tokenizer's length (an embedding matrix rounded
    up): the loss compares the first min(V) entries, given the tokenizer."""
    sizes = {"student": len(tokenizer), "teacher": len(tokenizer)}
    sizes[padded] += 64 - len(tokenizer) % 64 or 64
    student, teacher = tiny_gpt2(sizes["student"], seed=0), tiny_gpt2(sizes["teacher"], seed=1)
    inputs = batch(len(tokenizer))
    loss, _ = distillation_loss(student, teacher, inputs, fp.BridgeLoss(beta=0.5), tokenizer=tokenizer)
    torch.testing.assert_close(loss, teacher_forced_loss(student, teacher, inputs, len(tokenizer), beta=0.5))


def test_vocabularies_of_other_sizes_are_refused_without_the_tokenizer():
    """Without a tokenizer nothing tells padding rows from a different tokenizer: a ValueError that
    names both sizes (the first min(V) entries were compared silently)."""
    student, teacher = tiny_gpt2(101, seed=0), tiny_gpt2(108, seed=1)
    with pytest.raises(ValueError, match=r"student.* 101 .*teacher.* 108\b.*tokenizer"):
        distillation_loss(student, teacher, batch(), fp.BridgeLoss(beta=0.5))


def test_vocabularies_that_differ_beyond_the_tokenizer_are_refused(tokenizer):
    """The smaller model has fewer entries than the tokenizer has tokens: not padding, another
    tokenizer (or a truncated head); refused naming the sizes, with equal sizes too."""
    small, large = tiny_gpt2(len(tokenizer) - 1, seed=0), tiny_gpt2(len(tokenizer) + 64, seed=1)
    inputs = batch(len(tokenizer) - 1)
    for student, teacher in ((small, large), (large, small), (small, small)):
        with pytest.raises(ValueError, match=f"{len(tokenizer)} tokens.*{len(tokenizer) - 1}"):
            distillation_loss(student, teacher, inputs, fp.BridgeLoss(beta=0.5), tokenizer=tokenizer)


def test_a_table_smaller_than_the_tokenizer_is_refused_before_either_model_runs(tokenizer):
    """A model whose input embedding table is smaller than the tokenizer, fed the tokenizer's ids
    (its last one among them): the ValueError of vocabularies that differ beyond padding, before
    either model runs, where the teacher's embedding failed with an IndexError (on CUDA, a device
    assert) after the student had run."""
    small, large = tiny_gpt2(len(tokenizer) - 1, seed=0), tiny_gpt2(len(tokenizer), seed=1)
    inputs = batch(len(tokenizer))
    inputs["input_ids"][1, 2] = len(tokenizer) - 1
    calls = []
    for student, teacher in ((large, small), (small, large)):
        handles = [model.register_forward_pre_hook(lambda *_: calls.append(1)) for model in (student, teacher)]
        try:
            with pytest.raises(ValueError, match=f"{len(tokenizer)} tokens.*{len(tokenizer) - 1}.*input embedding"):
                distillation_loss(student, teacher, inputs, fp.BridgeLoss(beta=0.5), tokenizer=tokenizer)
        finally:
            for handle in handles:
                handle.remove()
    assert not calls


def test_an_offloaded_teacher_is_fed_where_it_computes(tokenizer):
    """A teacher whose weights accelerate offloads (meta placeholders, loaded by its hooks at each
    forward on the CPU) gives the loss of the teacher in memory; its inputs were sent to the meta
    device ("Cannot copy out of meta tensor")."""
    import accelerate

    student, teacher = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    inputs = batch()
    want, _ = distillation_loss(student, teacher, inputs, fp.BridgeLoss(beta=0.5))
    offloaded = accelerate.cpu_offload(copy.deepcopy(teacher), execution_device="cpu")
    assert next(offloaded.parameters()).is_meta
    got, _ = distillation_loss(student, offloaded, inputs, fp.BridgeLoss(beta=0.5))
    torch.testing.assert_close(got, want)


def fake_trainer(**attributes):
    """What compute_loss reads of a transformers.Trainer (one that divides by the accumulation steps itself)."""
    return SimpleNamespace(state=SimpleNamespace(global_step=0), loss_is_scaled_for_ga=False, **attributes)


def test_trainer_compute_loss_takes_the_tokenizer_from_the_trainer(tokenizer):
    """The Trainer's processing_class is the tokenizer that tells padding rows apart; one given to
    trainer_compute_loss wins; with neither, other sizes are refused."""
    student, teacher = tiny_gpt2(len(tokenizer), seed=0), tiny_gpt2(len(tokenizer) + 7, seed=1)
    inputs = batch(len(tokenizer))
    want = teacher_forced_loss(student, teacher, inputs, len(tokenizer), beta=0.5)
    compute_loss = trainer_compute_loss(teacher, fp.BridgeLoss(beta=0.5))
    torch.testing.assert_close(compute_loss(fake_trainer(processing_class=tokenizer), student, inputs), want)
    given = trainer_compute_loss(teacher, fp.BridgeLoss(beta=0.5), tokenizer=tokenizer)
    torch.testing.assert_close(given(fake_trainer(processing_class=None), student, inputs), want)
    with pytest.raises(ValueError, match="tokenizer"):
        compute_loss(fake_trainer(processing_class=None), student, inputs)


def test_labels_must_be_token_ids_or_the_ignore_index():
    """HF-style -100 labels with another ignore_index: -100 is no token id, and scoring those
    positions (the prompt's, the padding's) is never meant: refused, naming both values. The same
    positions marked with the module's ignore_index give the default's loss."""
    student, teacher = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    inputs = batch()
    default, _ = distillation_loss(student, teacher, inputs, fp.BridgeLoss(beta=0.5))
    with pytest.raises(ValueError, match=r"labels.*-100.*ignore_index.*-1"):
        distillation_loss(student, teacher, inputs, fp.BridgeLoss(beta=0.5, ignore_index=-1))
    marked = dict(inputs, labels=inputs["labels"].masked_fill(inputs["labels"] == -100, -1))
    loss, _ = distillation_loss(student, teacher, marked, fp.BridgeLoss(beta=0.5, ignore_index=-1))
    torch.testing.assert_close(loss, default)
    stray = inputs["labels"].clone()
    stray[1, 3] = -7
    with pytest.raises(ValueError, match="labels hold -7"):
        distillation_loss(student, teacher, dict(inputs, labels=stray), fp.BridgeLoss(beta=0.5))
    ran = []  # a label per token, checked before either model runs (it failed after both, unnamed)
    student.register_forward_hook(lambda *_: ran.append("student"))
    with pytest.raises(ValueError, match=r"^labels must have input_ids' shape"):
        distillation_loss(student, teacher, dict(inputs, labels=inputs["labels"][:, :5]), fp.BridgeLoss(beta=0.5))
    # a batch of 0 rows, as ids or as embeddings (it failed inside the student's attention, unnamed)
    embeds = student.get_input_embeddings()(inputs["input_ids"]).detach()
    for empty in ({name: value[:0] for name, value in inputs.items()},
                  {"inputs_embeds": embeds[:0], "attention_mask": inputs["attention_mask"][:0]}):
        with pytest.raises(ValueError, match=r"^inputs hold no rows \(batch size 0\)"):
            distillation_loss(student, teacher, empty, fp.BridgeLoss(beta=0.5))
    assert not ran


def test_without_labels_any_ignore_index_scores_every_real_next_token():
    """Without labels every position whose next token is real is scored, whatever the module's
    ignore_index: with ignore_index=0 (the marker of a scored position) nothing was, loss 0."""
    student, teacher = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    inputs = {name: value for name, value in batch().items() if name != "labels"}
    default, _ = distillation_loss(student, teacher, inputs, fp.BridgeLoss(beta=0.5))
    assert default > 0
    for ignore_index in (0, 1, -1):
        loss, _ = distillation_loss(student, teacher, inputs, fp.BridgeLoss(beta=0.5, ignore_index=ignore_index))
        torch.testing.assert_close(loss, default)


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


def test_trainer_evaluation_reports_the_loss_undivided_by_accumulation(tmp_path):
    """Trainer.evaluate with 4 accumulation steps reports the mean distillation loss of the eval
    examples, as without accumulation (transformers 5 passes num_items_in_batch to evaluation's
    compute_loss too: the loss was divided by 4 there)."""
    pytest.importorskip("accelerate")
    student, teacher = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    data = batch()
    examples = [{name: value[i] for name, value in data.items()} for i in (1, 2)]  # (unpadded: equal token counts)

    class DistillationTrainer(transformers.Trainer):
        compute_loss = trainer_compute_loss(teacher, fp.BridgeLoss(beta=0.5))

    reported = []
    for accumulation in (1, 4):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_eval_batch_size=1, gradient_accumulation_steps=accumulation,
            report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
        trainer = DistillationTrainer(model=student, args=args, eval_dataset=examples)
        reported.append(trainer.evaluate()["eval_loss"])
    with torch.no_grad():
        losses = [distillation_loss(student.eval(), teacher, {k: v[None] for k, v in e.items()},
                                    fp.BridgeLoss(beta=0.5))[0] for e in examples]
    want = float(sum(losses) / 2)
    assert reported == pytest.approx([want, want], rel=1e-5)


def test_the_teacher_builds_no_kv_cache():
    """The teacher's forward is one pass with no generation after it: asked for no KV cache, it
    holds no keys and values of every layer at once (a transformers model in eval mode built
    one by default, the size of the batch's keys and values across all layers, at the teacher
    forward's peak). The loss is the same."""
    from fastprobe.methods._batching import output_cache

    student, teacher = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    inputs = batch()
    caches = []
    handle = teacher.register_forward_hook(lambda module, args, output: caches.append(output_cache(output)))
    try:
        loss, _ = distillation_loss(student, teacher, inputs, fp.BridgeLoss(beta=0.5))
    finally:
        handle.remove()
    assert caches == [None]
    torch.testing.assert_close(loss, teacher_forced_loss(student, teacher, inputs, 101, beta=0.5))


def test_a_teacher_left_in_train_mode_runs_without_dropout():
    """A teacher in train mode with dropout (mixed flags) gives the loss of the teacher in eval
    mode, and every module's flag comes back, also after a failed teacher forward; the student
    runs in the mode it is in (training, dropout on). (The teacher ran with dropout on: a noisy
    target.)"""
    student, teacher = with_dropout(tiny_gpt2(seed=0)), with_dropout(tiny_gpt2(seed=1))
    student_flags = training_flags(student)
    inputs = batch()
    seen = []
    student.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    with torch.no_grad():
        twin = copy.deepcopy(student).eval()  # the student's logits without its dropout, for the check

    def measure():
        # the student's dropout drawn from a fixed seed, so that only the teacher's could differ
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return distillation_loss(student, teacher, inputs, fp.BridgeLoss(beta=0.5))[0]

    check_eval_mode([teacher], measure, lambda got, want: torch.testing.assert_close(got, want, rtol=0, atol=0))
    assert training_flags(student) == student_flags and seen and all(seen)
    loss = measure()
    assert not torch.allclose(loss, teacher_forced_loss(twin, teacher, inputs, 101, beta=0.5))  # student: dropout


def test_the_teachers_floating_inputs_take_its_dtype():
    """A bfloat16 teacher of a float32 student: floating inputs (here inputs_embeds; pixel values
    likewise) reach it in bfloat16, ids and masks as they are, and the caller's tensors are left
    alone. (They reached it in float32: a dtype error in its first layer norm.)"""
    student, teacher = tiny_gpt2(seed=0), tiny_gpt2(seed=1).to(torch.bfloat16)
    inputs = batch()
    inputs["inputs_embeds"] = student.transformer.wte(inputs.pop("input_ids")).detach()
    kept = {name: value.clone() for name, value in inputs.items()}
    seen = {}
    teacher.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    loss, _ = distillation_loss(student, teacher, inputs, fp.BridgeLoss(beta=0.5))
    assert seen["inputs_embeds"].dtype == torch.bfloat16 and seen["attention_mask"].dtype == torch.long
    assert all(torch.equal(inputs[name], kept[name]) and inputs[name].dtype == kept[name].dtype for name in kept)
    with torch.no_grad():
        mask = inputs["attention_mask"]
        s_logits = student(inputs_embeds=inputs["inputs_embeds"], attention_mask=mask).logits[:, :-1]
        t_logits = teacher(inputs_embeds=inputs["inputs_embeds"].bfloat16(), attention_mask=mask).logits[:, :-1]
    keep = inputs["labels"][:, 1:] != -100
    torch.testing.assert_close(loss, fp.bridge_loss(s_logits[keep], t_logits[keep].float(), beta=0.5))


def test_the_teachers_logits_reach_the_loss_in_its_dtype():
    """A bfloat16 teacher of a float32 student: its logits reach the loss in bfloat16, not copied
    into the student's dtype ([B, L, V] more memory; bridge_loss reads mixed dtypes as they are),
    and the loss is the one of those logits cast up (bridge_loss's dtype rule), bit for bit."""
    student, teacher = tiny_gpt2(seed=0), tiny_gpt2(seed=1).to(torch.bfloat16)
    inputs = batch()
    seen = []
    loss_fn = fp.BridgeLoss(beta=0.5, reduction="none")
    loss_fn.register_forward_pre_hook(lambda module, args: seen.append((args[0].dtype, args[1].dtype)))
    rows, _ = distillation_loss(student, teacher, inputs, loss_fn)
    assert seen == [(torch.float32, torch.bfloat16)]
    with torch.no_grad():
        s_logits = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        t_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    keep = inputs["labels"][:, 1:] != -100
    want = fp.bridge_loss(s_logits[keep], t_logits[keep].float(), beta=0.5, reduction="none")
    assert torch.equal(rows[:, :-1][keep].detach(), want)


def test_a_fused_linear_loss_is_refused_by_name():
    """distillation compares logits: a FusedLinearBridgeLoss (hidden states and weights) is refused
    naming what to give instead, by trainer_compute_loss when it is built and by distillation_loss
    before either model runs (it failed after both had, on FusedLinearBridgeLoss.forward's missing
    arguments)."""
    student, teacher = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    fused = fp.FusedLinearBridgeLoss(beta=0.5)
    with pytest.raises(TypeError, match="loss_fn is a FusedLinearBridgeLoss.*give a BridgeLoss"):
        trainer_compute_loss(teacher, fused)
    calls = []
    student.register_forward_hook(lambda *args: calls.append("student"))
    with pytest.raises(TypeError, match="loss_fn is a FusedLinearBridgeLoss.*give a BridgeLoss"):
        distillation_loss(student, teacher, batch(), fused)
    assert not calls
