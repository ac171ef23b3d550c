"""fastprobe.methods.nullspace on small built-in models (random weights, no downloads): the
subspace recovers planted directions and checks k; the projection leaves no component along U at
its layer (and exactly h - (h U) U^T there; a rounded U loses its whole span), changes the
outputs, keeps the dtype, works in generate with a KV cache, and comes off leaving the outputs
bit for bit as before; shift vectors from text pairs on a tiny Llama and image / no-image pairs
on a tiny LLaVA; bad input raises a clear ValueError with the model left alone."""

import numpy as np
import pytest
import torch

from fastprobe.methods.nullspace import Projection, bias_subspace, project_out, shift_vectors
from fastprobe.methods.probes import collect_hidden_states, collect_hidden_states_from_batches, transformer_blocks
from fastprobe.models import DEMO_TEXTS, IMAGE_TOKEN, tiny_llava, tiny_llava_processor, tiny_model, tiny_tokenizer

pytest.importorskip("transformers")

TEXTS = DEMO_TEXTS[:6]
PREFIX = "Looking at the picture of the harbour: "  # the "modality" of the text pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer), num_layers=3)


@pytest.fixture(scope="module")
def text_basis(model, tokenizer):
    """U (k = 2) of the shifts the prefix causes at layer 1 of the tiny Llama."""
    shifts = shift_vectors(model, [PREFIX + text for text in TEXTS], TEXTS, layer=1, tokenizer=tokenizer,
                           progress=False)
    return bias_subspace(shifts, 2)


def logits_of(model, tokenizer, texts=TEXTS[:3]):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def weights_of(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def hooks_on(model) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


# ---------------------------------------------------------------- the subspace


def test_bias_subspace_recovers_planted_directions():
    generator = torch.Generator().manual_seed(0)
    width, rows = 48, 30
    planted = torch.linalg.qr(torch.randn(width, 2, generator=generator)).Q  # two orthonormal directions
    scales = torch.randn(rows, 2, generator=generator) * torch.tensor([5.0, 2.0])
    shifts = scales @ planted.T + 0.01 * torch.randn(rows, width, generator=generator)
    kept = shifts.clone()
    one = bias_subspace(shifts, 1)
    assert one.shape == (width, 1) and one.dtype == torch.float32
    assert abs(float(one[:, 0] @ planted[:, 0])) > 0.999  # the stronger direction first
    two = bias_subspace(shifts.to(torch.bfloat16), 2)
    torch.testing.assert_close(two.T @ two, torch.eye(2), rtol=0, atol=1e-6)
    captured = (two.T @ planted).norm(dim=0)  # |projection of each planted direction onto span(U)|
    assert bool((captured > 0.999).all())
    assert torch.equal(shifts, kept)
    flipped = bias_subspace(-shifts, 2)
    torch.testing.assert_close(flipped, bias_subspace(shifts, 2))  # signs fixed, not arbitrary


@pytest.mark.parametrize("shifts, k, match", [
    (torch.randn(5, 8), 0, r"k must be an integer in 1..min\(M, H\) = 1..5"),
    (torch.randn(5, 8), 6, "k must be"),
    (torch.randn(9, 4), 5, r"1..4"),
    (torch.randn(5, 8), True, "k must be"),
    (torch.randn(5, 8), 1.0, "k must be"),
    (torch.randn(8), 1, r"\[M, H\]"),
    (torch.randn(2, 3, 4), 1, r"\[M, H\]"),
    (torch.ones(5, 8, dtype=torch.long), 1, "floating"),
    (torch.full((5, 8), float("nan")), 1, "NaN"),
    (torch.zeros(5, 8), 1, "fewer than k"),
    (torch.ones(5, 8), 2, "fewer than k = 2"),
    # float32 multiples of one vector: rank 1 up to float32 rounding, which leaves ~1e-8 s_0
    (torch.linspace(0.5, 3.0, 10)[:, None] * torch.randn(1, 64), 3, "fewer than k = 3"),
    ((torch.linspace(0.5, 3.0, 10)[:, None] * torch.randn(1, 64)).bfloat16(), 2, "fewer than k = 2"),
])
def test_bias_subspace_bad_input(shifts, k, match):
    with pytest.raises(ValueError, match=match):
        bias_subspace(shifts, k)


# ---------------------------------------------------------------- the projection


def test_projection_removes_the_subspace_and_comes_off_exactly(model, tokenizer, text_basis):
    basis, kept_basis, kept_weights = text_basis, text_basis.clone(), weights_of(model)
    before = logits_of(model, tokenizer)
    plain = collect_hidden_states(model, tokenizer, TEXTS[:3], layers=[1, 2], pool=None, progress=False)
    hooks = hooks_on(model)
    handle = project_out(model, basis, layer=-2)  # block 1 of 3
    assert isinstance(handle, Projection) and handle.active and handle.layer == 1
    assert repr(handle) == "Projection(layer=1, k=2, active=True)"
    projected = collect_hidden_states(model, tokenizer, TEXTS[:3], layers=[1, 2], pool=None, progress=False)
    real = projected.mask
    assert float((projected[1] @ basis)[real].abs().max()) < 1e-5  # no component along U at the layer
    want = plain[1] - (plain[1] @ basis) @ basis.T  # h - (h U) U^T
    torch.testing.assert_close(projected[1], want, rtol=1e-5, atol=1e-5)
    assert float((projected[2] - plain[2])[real].abs().max()) > 1e-3  # the next block sees the change
    during = logits_of(model, tokenizer)
    assert float((during - before).abs().max()) > 1e-3
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.active and hooks_on(model) == hooks
    assert repr(handle) == "Projection(layer=1, k=2, active=False)"
    assert torch.equal(logits_of(model, tokenizer), before)
    with project_out(model, basis[:, 0], layer=1):  # one direction [H]
        assert not torch.equal(logits_of(model, tokenizer), before)
    assert torch.equal(logits_of(model, tokenizer), before)
    assert torch.equal(basis, kept_basis)
    assert all(torch.equal(value, kept_weights[name]) for name, value in model.state_dict().items())


def test_projection_refuses_a_compiled_model(tokenizer, text_basis):
    """A hook added after torch.compile is not seen by the compiled forward: the projection on a
    compiled wrapper (or a module compiled in place) ran unprojected; refused, nothing hooked."""
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=3)
    in_place = tiny_model("llama", vocab_size=len(tokenizer), num_layers=3)
    in_place.compile(backend="eager")
    before = hooks_on(model), hooks_on(in_place)
    for compiled in (torch.compile(model, backend="eager"), in_place):
        with pytest.raises(RuntimeError, match="compiled by torch.compile"):
            project_out(compiled, text_basis, layer=0)
    assert (hooks_on(model), hooks_on(in_place)) == before


def test_output_hidden_states_show_the_projection_whenever_asked(tokenizer, text_basis):
    """transformers 5 records output_hidden_states through forward hooks it installs on the first
    call that asks for them: a model asked before project_out had them ahead of the projection
    (hidden_states[layer + 1] showed the unprojected state, 6e-2 along U). 4.53 appends each
    block's input in the model's own loop, after the previous block's hooks: it shows it too.
    4.54-4.5x record inside the block's forward (check_model_inputs' wrapper, for models with
    _can_record_outputs), before any hook (documented)."""
    transformers = pytest.importorskip("transformers")
    if (int(transformers.__version__.split(".")[0]) < 5
            and getattr(tiny_model("llama", vocab_size=len(tokenizer), num_layers=1), "_can_record_outputs", None)):
        pytest.skip(f"transformers {transformers.__version__} records hidden states inside the block's forward, "
                    "before any forward hook")
    batch = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    for asked_before in (False, True):
        model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=3)
        with torch.no_grad():
            if asked_before:
                model(**batch, output_hidden_states=True)
            with project_out(model, text_basis, layer=1):
                states = model(**batch, output_hidden_states=True).hidden_states
        assert float((states[2] @ text_basis)[real].abs().max()) < 1e-5, asked_before


def test_projection_keeps_the_dtype(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=2, dtype=torch.bfloat16)
    basis = torch.linalg.qr(torch.randn(64, 3)).Q
    with project_out(model, basis, layer=0):
        states = collect_hidden_states(model, tokenizer, TEXTS[:2], layers=[0], pool=None, dtype=None, progress=False)
        logits = logits_of(model, tokenizer, TEXTS[:2])
    assert states[0].dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    along = states[0].float() @ basis
    assert float(along[states.mask].abs().max()) < 0.05 * float(states[0].float().abs().max())


def test_a_rounded_basis_still_removes_its_whole_span(model, tokenizer):
    """A basis stored in bfloat16 (orthonormal to ~1e-3, which project_out accepts) projects out
    exactly the span of its columns, not (I - U U^T) of the rounded U, which would leave ~1e-3 of
    the component along them; the caller's basis is left as it was."""
    exact = torch.linalg.qr(torch.randn(64, 3, dtype=torch.float64)).Q
    rounded = exact.to(torch.bfloat16)
    kept, span = rounded.clone(), torch.linalg.qr(rounded.double()).Q  # orthonormal, spanning what rounded does
    with project_out(model, rounded, layer=1) as handle:
        hidden = torch.randn(4, 7, 64, dtype=torch.float64)
        along = handle.project(hidden) @ span
        states = collect_hidden_states(model, tokenizer, TEXTS[:3], layers=[1], pool=None, progress=False)
    assert float(along.abs().max()) < 1e-8 * float(hidden.abs().max())
    residual = (states[1].double() @ span)[states.mask]
    assert float(residual.abs().max()) < 1e-5 * float(states[1].abs().max())
    torch.testing.assert_close(handle.basis.T @ handle.basis, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(rounded, kept)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_projection_removes_its_whole_span_under_autocast(model, tokenizer, text_basis, dtype):
    """A float32 model run under torch.autocast: the projection is computed in float32 all the
    same (autocast's low-precision matrix products left ~1e-3 of the component along U), and
    project gives what it gives outside autocast."""
    hidden = torch.randn(3, 5, 64)
    with project_out(model, text_basis, layer=1) as handle:
        want = handle.project(hidden)
        with torch.autocast("cpu", dtype=dtype):
            got = handle.project(hidden)
            states = collect_hidden_states(model, tokenizer, TEXTS[:3], layers=[1], pool=None, dtype=None,
                                           progress=False)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    residual = (states[1].double() @ text_basis.double())[states.mask]
    assert float(residual.abs().max()) < 1e-5 * float(states[1].abs().max())

def test_generate_with_the_projection(model, tokenizer, text_basis):
    """Greedy generate under the hook: different logits from plain generation, the same with
    and without the KV cache (the hook acts on every step), and plain generation afterwards."""
    tokenizer.padding_side = "left"
    batch = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    tokenizer.padding_side = "right"
    settings = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
                    pad_token_id=tokenizer.pad_token_id)

    def generate(**options):
        with torch.no_grad():
            result = model.generate(**batch, **settings, **options)
        return torch.stack(result.logits, 1)

    plain = generate()
    with project_out(model, text_basis, layer=1):
        cached = generate(use_cache=True)
        uncached = generate(use_cache=False)
    torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-4)
    assert float((cached - plain).abs().max()) > 1e-3
    assert torch.equal(generate(), plain)


def test_shift_vectors_from_text_pairs(model, tokenizer, text_basis):
    """shift = pooled(with) - pooled(without), whatever the inputs' form; after projecting U out
    at the layer, the shifts have no component along U."""
    with_prefix = [PREFIX + text for text in TEXTS]
    shifts = shift_vectors(model, with_prefix, TEXTS, layer=1, tokenizer=tokenizer, pool="mean", batch_size=4,
                           progress=False)
    states = [collect_hidden_states(model, tokenizer, texts, layers=[1], pool="mean", progress=False)[1]
              for texts in (with_prefix, TEXTS)]
    torch.testing.assert_close(shifts, states[0] - states[1], rtol=1e-5, atol=1e-5)
    batches = [dict(tokenizer(TEXTS[:4], padding=True, return_tensors="pt")),
               dict(tokenizer(TEXTS[4:], padding=True, return_tensors="pt"))]
    mixed = shift_vectors(model, with_prefix, batches, layer=1, tokenizer=tokenizer, pool="mean", progress=False)
    torch.testing.assert_close(mixed, shifts, rtol=1e-4, atol=1e-5)
    last = shift_vectors(model, with_prefix, TEXTS, layer=1, tokenizer=tokenizer, progress=False)
    assert last.shape == (6, 64) and float((last @ text_basis).norm()) > 0.1 * float(last.norm())
    with project_out(model, text_basis, layer=1):
        after = shift_vectors(model, with_prefix, TEXTS, layer=1, tokenizer=tokenizer, progress=False)
    assert float((after @ text_basis).abs().max()) < 1e-5


def test_image_and_no_image_pairs_on_a_tiny_llava():
    processor = tiny_llava_processor()
    model = tiny_llava(processor)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(4)]
    prompts = ["Describe the picture.", "What is in it? Tell me", "Name the colours", "Is it a cat?"]
    with_image = processor(images=images, text=[f"{IMAGE_TOKEN}\n{p}" for p in prompts], return_tensors="pt",
                           padding=True)
    without_image = processor(text=prompts, return_tensors="pt", padding=True)
    shifts = shift_vectors(model, [with_image], [without_image], layer=0, progress=False)
    assert shifts.shape == (4, 64) and float(shifts.norm(dim=1).min()) > 0
    basis = bias_subspace(shifts, 2)
    before = collect_hidden_states_from_batches(model, with_image, layers=[1], progress=False)[1]
    hooks = hooks_on(model)
    with project_out(model, basis, layer=0):
        states = collect_hidden_states_from_batches(model, with_image, layers=[0, 1], pool=None, progress=False)
        after = shift_vectors(model, with_image, without_image, layer=0, progress=False)
        with torch.no_grad():
            ids = model.generate(**with_image, max_new_tokens=3, do_sample=False)
    assert float((states[0] @ basis)[states.mask].abs().max()) < 1e-5
    assert float((after @ basis).abs().max()) < 1e-5
    last = states[1][torch.arange(4), states.mask.sum(1) - 1]
    assert float((last - before).abs().max()) > 1e-4
    assert ids.shape == (4, with_image["input_ids"].shape[1] + 3)
    assert hooks_on(model) == hooks


@pytest.mark.parametrize("call, match", [
    (dict(layer=3), "layer: layer 3 is out of range"),
    (dict(layer=[1]), "layer must be an int"),
    (dict(basis=torch.randn(64, 2)), "orthonormal"),
    (dict(basis=torch.linalg.qr(torch.randn(32, 2)).Q), "hidden size is 64"),
    (dict(basis=torch.ones(64, 2, dtype=torch.long)), "floating"),
    (dict(basis=torch.randn(64, 2, 2)), r"\[H, k\]"),
    (dict(basis=torch.full((64, 2), float("nan"))), "basis holds NaN or infinite values"),
])
def test_project_out_bad_input_leaves_the_model_alone(model, call, match):
    arguments = dict(basis=torch.linalg.qr(torch.randn(64, 2)).Q, layer=1)
    arguments.update(call)
    hooks = hooks_on(model)
    with pytest.raises(ValueError, match=match):
        project_out(model, arguments.pop("basis"), **arguments)
    assert hooks_on(model) == hooks


def test_shift_vectors_bad_input(model, tokenizer):
    ran = []
    handle = transformer_blocks(model)[0].register_forward_hook(lambda *_: ran.append(1))
    try:
        with pytest.raises(ValueError, match="with_modality holds 2 inputs but without_modality 3"):
            shift_vectors(model, TEXTS[:2], TEXTS[:3], layer=0, tokenizer=tokenizer)
        with pytest.raises(ValueError, match="need a tokenizer"):
            shift_vectors(model, TEXTS[:2], TEXTS[:2], layer=0)
        with pytest.raises(ValueError, match="pool must be 'last' or 'mean'"):
            shift_vectors(model, TEXTS[:2], TEXTS[:2], layer=0, tokenizer=tokenizer, pool=None)
        with pytest.raises(ValueError, match="not a mix"):
            shift_vectors(model, [TEXTS[0], {"input_ids": torch.ones(1, 2, dtype=torch.long)}], TEXTS[:2], layer=0,
                          tokenizer=tokenizer)
        with pytest.raises(ValueError, match="got an element of type Tensor"):
            shift_vectors(model, [torch.ones(1, 2, dtype=torch.long)], TEXTS[:1], layer=0, tokenizer=tokenizer)
        with pytest.raises(ValueError, match="with_modality must be texts or batches of model inputs, got int"):
            shift_vectors(model, 5, TEXTS[:2], layer=0, tokenizer=tokenizer)
        with pytest.raises(ValueError, match="without_modality is empty"):
            shift_vectors(model, TEXTS[:2], [], layer=0, tokenizer=tokenizer)
        with pytest.raises(ValueError, match="out of range"):
            shift_vectors(model, TEXTS[:2], TEXTS[:2], layer=-4, tokenizer=tokenizer)
    finally:
        handle.remove()
    assert not ran


def test_shift_vectors_read_generators_once(model, tokenizer):
    """Inputs given as generators (of texts, or of batches) are read once: the same shifts as
    lists, not "texts is empty" from a generator already used up to count its rows."""
    with_prefix = [PREFIX + text for text in TEXTS[:3]]
    want = shift_vectors(model, with_prefix, TEXTS[:3], layer=0, tokenizer=tokenizer, progress=False)
    got = shift_vectors(model, (text for text in with_prefix), (text for text in TEXTS[:3]), layer=0,
                        tokenizer=tokenizer, progress=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    batches = (dict(tokenizer([text], return_tensors="pt")) for text in TEXTS[:3])
    torch.testing.assert_close(shift_vectors(model, with_prefix, batches, layer=0, tokenizer=tokenizer,
                                             progress=False), want, rtol=1e-5, atol=1e-5)
