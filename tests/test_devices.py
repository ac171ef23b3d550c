"""Model-level paths on the device the model lives on: a patched model against its unpatched twin
(prefill, generate, recorded statistics against eager weights), guidance at gamma = 0, and every
method, in float32 and bfloat16. The CPU cases run everywhere; the CUDA cases (pytest -m gpu) run
the Triton kernels inside real transformers models."""

import numpy as np
import pytest
import torch

import fastprobe as fp
from fastprobe.methods import availability, guidance, nullspace, probes, soft_prompts, uncertainty
from fastprobe.models import IMAGE_TOKEN, DEMO_TEXTS, tiny_llava, tiny_llava_processor, tiny_model, tiny_tokenizer

from .transformers_helpers import patch_or_skip

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
PLACES = [
    pytest.param("cpu", torch.float32, id="cpu-float32"),
    pytest.param("cuda", torch.float32, id="cuda-float32", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=pytest.mark.gpu),
]
# logits of the tiny models are O(1): float32 kernels agree to ~1e-5, bfloat16 ones to its rounding
LOGIT_TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}
TEXTS = DEMO_TEXTS[:5]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def batch_on(tokenizer, device, side="left"):
    tokenizer.padding_side = side
    try:
        encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    return {name: value.to(device) for name, value in encoded.items()}


def model_on(arch, tokenizer, device, dtype, **options):
    return tiny_model(arch, vocab_size=len(tokenizer), dtype=dtype, **options).to(device)


# ---------------------------------------------------------------- patch and record_attention


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
@pytest.mark.parametrize("device, dtype", PLACES)
def test_patched_model_matches_its_unpatched_twin(tokenizer, arch, device, dtype):
    """The twin runs the model's default attention (SDPA; eager for Gemma 2's softcap)."""
    twin = model_on(arch, tokenizer, device, dtype)
    model = patch_or_skip(model_on(arch, tokenizer, device, dtype))
    batch = batch_on(tokenizer, device)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        got, want = model(**batch).logits, twin(**batch).logits
    torch.testing.assert_close(got[real].float(), want[real].float(), **LOGIT_TOLERANCE[dtype])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id, output_logits=True,
                    return_dict_in_generate=True)
    with torch.no_grad():
        got, want = model.generate(**batch, **settings), twin.generate(**batch, **settings)
    # each step's logits, given the same prefix: compare while the greedy tokens agree
    # (bfloat16 rounding may break a near-tie of a random model's logits)
    prompt = batch["input_ids"].shape[1]
    same = (got.sequences[:, prompt:] == want.sequences[:, prompt:]).all(0).long().cumprod(0)
    steps = int(same.sum()) + (1 if int(same.sum()) < len(got.logits) else 0)
    for step in range(steps):
        torch.testing.assert_close(got.logits[step].float(), want.logits[step].float(), **LOGIT_TOLERANCE[dtype])
    if dtype == torch.float32:
        assert torch.equal(got.sequences, want.sequences)


@pytest.mark.parametrize("device, dtype", PLACES)
def test_recorded_sink_mass_matches_eager_weights(tokenizer, device, dtype):
    eager = model_on("llama", tokenizer, device, dtype, attn_implementation="eager")
    model = patch_or_skip(model_on("llama", tokenizer, device, dtype))
    batch = batch_on(tokenizer, device, side="right")
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        weights = eager(**batch, output_attentions=True).attentions
        with fp.record_attention(model) as record:
            model(**batch)
    first = batch["attention_mask"].long().argmax(-1).view(-1, 1, 1, 1)
    expected = torch.stack([(w.float().gather(-1, first.expand(*w.shape[:3], 1))[..., 0] * real[:, None]).sum((0, 2))
                            / real.sum() for w in weights])
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(record.sink_mass.float().to(device), expected, **tolerance)


@pytest.mark.parametrize("device, dtype", PLACES)
def test_guidance_at_gamma_zero_is_plain_generation(device, dtype):
    processor = tiny_llava_processor()
    model = tiny_llava(processor, dtype=dtype).to(device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(2)]
    prompts = [f"{IMAGE_TOKEN}\nDescribe it.", f"A photo: {IMAGE_TOKEN} What is in it?"]
    settings = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(**guidance.prepare_inputs(model, processor, images, prompts), **settings)
    guided = guidance.guided_generate(model, processor, images, prompts, gamma=0.0, **settings)
    torch.testing.assert_close(guided.logits[0].float(), plain.logits[0].float(), **LOGIT_TOLERANCE[dtype])
    if dtype == torch.float32:
        assert torch.equal(guided.sequences, plain.sequences)
    moved = guidance.guided_generate(model, processor, images, prompts, gamma=1.0, max_new_tokens=3, do_sample=False)
    assert moved.device.type == device


# ---------------------------------------------------------------- the methods


def test_methods_on_the_models_device_equal_their_cpu_results(tokenizer, device="cpu"):
    """The CPU case of test_methods_on_a_device: run here to keep its expectations honest."""
    check_methods(tokenizer, device)


@pytest.mark.gpu
def test_methods_on_cuda_equal_their_cpu_results(tokenizer):
    check_methods(tokenizer, "cuda")


def sharp(model):
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def check_methods(tokenizer, device):
    """Each method on a float32 model on `device` gives its CPU figures."""
    pytest.importorskip("pandas")  # the tables
    def pair(arch="llama", seed=0):
        return sharp(tiny_model(arch, vocab_size=len(tokenizer), seed=seed)), \
            sharp(tiny_model(arch, vocab_size=len(tokenizer), seed=seed)).to(device)

    (target, target_on), (draft, draft_on) = pair(seed=0), pair("gpt2", seed=1)
    options = dict(batch_size=2, progress=False)
    want = uncertainty.token_uncertainty(target, [draft], tokenizer, TEXTS, **options)
    got = uncertainty.token_uncertainty(target_on, [draft_on], tokenizer, TEXTS, **options)
    assert got["token_id"].tolist() == want["token_id"].tolist()
    np.testing.assert_allclose(got[list(uncertainty.MEASURES)].to_numpy(), want[list(uncertainty.MEASURES)].to_numpy(),
                               atol=1e-4, rtol=1e-4)

    prompts, answers = ["The river ran past the old", "She opened the"], [["mill", "bridge"], "window"]
    want = availability.answer_availability(target, tokenizer, prompts, answers, max_new_tokens=3, progress=False)
    got = availability.answer_availability(target_on, tokenizer, prompts, answers, max_new_tokens=3, progress=False)
    np.testing.assert_allclose(got["mass"].to_numpy(), want["mass"].to_numpy(), rtol=1e-3)
    assert got["generated"].tolist() == want["generated"].tolist()

    want = probes.collect_hidden_states(target, tokenizer, TEXTS, layers=[0, 1], pool="mean", progress=False)
    got = probes.collect_hidden_states(target_on, tokenizer, TEXTS, layers=[0, 1], pool="mean", progress=False,
                                       on_device=True)
    assert got[1].device.type == device
    torch.testing.assert_close(got[1].cpu(), want[1], atol=1e-4, rtol=1e-4)

    basis = nullspace.bias_subspace(torch.randn(6, target.config.hidden_size, generator=torch.Generator().manual_seed(0)), 2)
    with nullspace.project_out(target_on, basis, layer=0):
        projected = probes.collect_hidden_states(target_on, tokenizer, TEXTS, layers=[0], pool=None, progress=False)
    assert float((projected[0] @ basis).abs().max()) < 1e-4

    batch = batch_on(tokenizer, device)
    with torch.no_grad():
        plain = target_on.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    none = soft_prompts.soft_prompt_generate(target_on, tokenizer, TEXTS, n=0, max_new_tokens=4, do_sample=False)
    assert torch.equal(none, plain[:, batch["input_ids"].shape[1]:])
    drawn = soft_prompts.soft_prompt_generate(target_on, tokenizer, TEXTS, n=3, seed=0, max_new_tokens=4,
                                              do_sample=False)
    assert drawn.device.type == device and drawn.shape == none.shape


@pytest.mark.gpu
def test_distillation_with_the_teacher_on_another_device(tokenizer):
    """A teacher kept on the CPU while the student trains on CUDA: inputs go to the teacher's
    device and its logits come back; the loss equals the all-CPU one."""
    from fastprobe.methods.distillation import distillation_loss

    student, teacher = tiny_model("llama", vocab_size=len(tokenizer), seed=0), tiny_model("gpt2", vocab_size=len(tokenizer), seed=1)
    batch = batch_on(tokenizer, "cpu", side="right")
    inputs = {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}
    want, _ = distillation_loss(student, teacher, inputs, fp.BridgeLoss(beta=0.5))
    on_cuda = {name: value.to("cuda") for name, value in inputs.items()}
    got, _ = distillation_loss(student.to("cuda"), teacher, on_cuda, fp.BridgeLoss(beta=0.5))
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
