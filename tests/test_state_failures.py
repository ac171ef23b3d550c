"""The patch and record state of fastprobe.integrations against failures and concurrency: a
forward that raises part-way (an error, an out-of-memory error, a KeyboardInterrupt) inside
record_attention, patched_with, a prune_heads block or guided generation leaves the model as it
was; backward's recomputation under gradient checkpointing is not recorded twice; patch and
option changes from other threads leave no broken or stale state behind."""

import copy
import dataclasses
import threading

import numpy as np
import pytest
import torch

import fastprobe as fp
from fastprobe.integrations import is_patched, patch_options
from fastprobe.integrations import transformers as integration
from fastprobe.methods import guidance
from fastprobe.methods.sinks import prune_heads
from fastprobe.models import IMAGE_TOKEN, tiny_llava, tiny_llava_processor, tiny_model

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 3
FAILURES = [RuntimeError("CUDA out of memory (simulated)"), KeyboardInterrupt()]


def inputs(batch=2, length=9):
    ids = torch.randint(3, 500, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # (row 0 left-padded)
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def raise_after_layer(model, layer: int, failure: BaseException):
    """A forward hook on fastprobe's layer `layer` that raises `failure` (once its attention ran)."""
    def hook(module, args, output):
        raise failure

    return integration.attention_layers(model)[layer].register_forward_hook(hook)


def assert_unpatched_like(model, reference, ids, mask):
    assert not is_patched(model)
    assert model.config._attn_implementation == reference.config._attn_implementation
    assert not model._forward_hooks and not model._forward_pre_hooks
    torch.testing.assert_close(logits(model, ids, mask), logits(reference, ids, mask), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- a forward that raises part-way


@pytest.mark.parametrize("failure", FAILURES, ids=lambda failure: type(failure).__name__)
def test_a_failed_pass_in_record_attention_keeps_the_layers_it_ran_and_unpatches(failure):
    """As record_attention documents: the layers a failed pass ran are in the record (the others
    NaN), the block's temporary patch is undone, and the next forward is the unpatched model's."""
    reference = tiny_model("llama", num_layers=LAYERS)
    model = copy.deepcopy(reference)
    ids, mask = inputs()
    hook = raise_after_layer(model, 1, failure)
    with pytest.raises(type(failure)):
        with fp.record_attention(model) as record:
            logits(model, ids, mask)
    hook.remove()
    real_queries = int(mask.sum())
    assert record.num_queries.tolist() == [real_queries, real_queries, 0]
    assert record.sink_mass[:2].isfinite().all() and record.sink_mass[2].isnan().all()
    assert_unpatched_like(model, reference, ids, mask)


@pytest.mark.parametrize("failure", FAILURES, ids=lambda failure: type(failure).__name__)
def test_a_failed_pass_in_patched_with_and_a_pruning_block_restores_the_options(failure):
    reference = tiny_model("llama", num_layers=LAYERS)
    model = fp.patch(copy.deepcopy(reference), num_sink=1)
    ids, mask = inputs()
    hook = raise_after_layer(model, 1, failure)
    with pytest.raises(type(failure)):
        with fp.integrations.patched_with(model, window=2), prune_heads(model, [(0, 1), (2, 3)]):
            logits(model, ids, mask)
    hook.remove()
    assert patch_options(model) == integration.PatchOptions(num_sink=1)
    assert not hasattr(model, "_fastprobe_pruned")
    torch.testing.assert_close(logits(model, ids, mask), logits(fp.patch(reference, num_sink=1), ids, mask))
    fp.unpatch(model)
    fp.unpatch(reference)
    assert_unpatched_like(model, reference, ids, mask)


@pytest.mark.parametrize("failure", FAILURES, ids=lambda failure: type(failure).__name__)
def test_guided_generation_that_fails_mid_way_leaves_the_next_one_as_a_fresh_models(failure):
    """A guided generate that raises at a decoding step (its cache half-written, image keys
    extended): the model is unpatched, and the next guided generate gives a fresh model's tokens."""
    processor = tiny_llava_processor()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8), rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)]
    prompts = [f"{IMAGE_TOKEN}\nDescribe the picture.", f"A photo: {IMAGE_TOKEN} What is in it? Tell me"]
    settings = dict(gamma=2.0, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want = guidance.guided_generate(tiny_llava(processor), processor, images, prompts, **settings)
    model = tiny_llava(processor)
    before = model.config.text_config._attn_implementation  # (sdpa; eager on transformers 4.53)
    calls = []

    def fail_on_the_third_step(module, args, output):
        calls.append(None)
        if len(calls) == 3:
            raise failure

    hook = integration.attention_layers(model)[-1].register_forward_hook(fail_on_the_third_step)
    with pytest.raises(type(failure)):
        guidance.guided_generate(model, processor, images, prompts, **settings)
    hook.remove()
    assert not is_patched(model) and model.config.text_config._attn_implementation == before
    got = guidance.guided_generate(model, processor, images, prompts, **settings)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b, msg=lambda message: f"step {step}: {message}")


# ---------------------------------------------------------------- gradients on


def test_a_record_does_not_keep_the_autograd_graphs_of_the_forwards_it_recorded():
    """A forward run with gradients on (no torch.no_grad) inside record_attention: the statistics
    were added to the record's sums attached, so the sums held every recorded forward's autograd
    graph, and its activations with it, as long as the record was kept."""
    import gc
    import weakref

    model = tiny_model("llama", num_layers=LAYERS)
    ids, mask = inputs()
    inputs_of_a_projection = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, output: inputs_of_a_projection.append(weakref.ref(args[0])))
    with fp.record_attention(model, statistics=("sink_mass", "entropy")) as record:
        model(input_ids=ids, attention_mask=mask)
    hook.remove()
    gc.collect()
    assert inputs_of_a_projection[0]() is None  # (an activation the forward's graph saved for backward)
    assert not any(table.requires_grad for table in record._sums.values())
    assert not record.sink_mass.requires_grad and not record.entropy.requires_grad


# ---------------------------------------------------------------- gradient checkpointing


def checkpointed(model, use_reentrant: bool):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    return model.train()


def test_backward_recomputation_under_gradient_checkpointing_is_not_recorded_twice():
    """Gradient checkpointing reruns a layer's forward in backward: the record counted that layer's
    queries twice (36 for 18), silently where backward does not go through the attention (here
    only the last layer's MLP trains, on inputs that need no gradient)."""
    model = tiny_model("llama", num_layers=LAYERS)
    model.requires_grad_(False)
    model.model.layers[-1].mlp.requires_grad_(True)
    checkpointed(model, use_reentrant=False)
    if hasattr(model, "_require_grads_hook"):  # (transformers 5.x hooks the inputs for any checkpointing, 4.5x not)
        model.disable_input_require_grads()
    ids, mask = inputs()
    with fp.record_attention(model) as record:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert model.model.layers[-1].mlp.up_proj.weight.grad is not None  # (the layer was recomputed)
    assert record.num_queries.tolist() == [int(mask.sum())] * LAYERS


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_training_through_a_checkpointed_patched_model_says_it_is_forward_only(use_reentrant):
    model = checkpointed(tiny_model("llama", num_layers=LAYERS), use_reentrant)
    ids, mask = inputs()
    with fp.record_attention(model) as record:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        with pytest.raises(RuntimeError, match="forward-only: training through it is not supported"):
            loss.backward()
    assert record.num_queries.tolist() == [int(mask.sum())] * LAYERS
    assert not is_patched(model)


def test_guidance_recomputed_by_gradient_checkpointing_says_it_is_forward_only():
    """The recomputed guided layer runs outside the forward that tracked the image keys: the error
    said to call the patched model itself (which the user did)."""
    model = fp.patch(checkpointed(tiny_llava(), use_reentrant=True), guidance=dict(gamma=1.0))
    ids = torch.randint(3, 400, (1, 10))
    ids[0, 2:6] = model.config.image_token_index
    loss = model(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28), labels=ids).loss
    with pytest.raises(RuntimeError, match="gradient checkpointing recomputes the layer in backward.*forward-only"):
        loss.backward()


# ---------------------------------------------------------------- threads


def test_two_threads_patching_one_model_at_once_leave_one_patch(monkeypatch):
    """Two threads patching one unpatched model at once (record_attention or patched_with in
    each): both found it unpatched and both hooked it; unpatch removed one pair of hooks, and the
    other's failed every later forward of the model (AttributeError)."""
    model = tiny_model("llama", num_layers=LAYERS)
    reference = copy.deepcopy(model)
    first_checked, second_done = threading.Event(), threading.Event()
    check = integration._refuse_layers_patched_through_another

    def slow_check(*args):  # (the first thread pauses after finding the model unpatched)
        check(*args)
        if not first_checked.is_set():
            first_checked.set()
            second_done.wait(timeout=0.5)

    monkeypatch.setattr(integration, "_refuse_layers_patched_through_another", slow_check)
    errors = []

    def patch(after=None):
        if after is not None:
            after.wait()
        try:
            fp.patch(model)
        except Exception as error:  # (reported below)
            errors.append(error)
        second_done.set()

    threads = [threading.Thread(target=patch), threading.Thread(target=patch, args=(first_checked,))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    fp.unpatch(model)
    assert_unpatched_like(model, reference, *inputs())


def test_a_head_mask_changed_during_a_forward_is_not_replaced_by_the_old_one():
    """update_patch (in another thread) between a forward reading a layer's head mask and copying
    it to the device: the old mask was kept as the new options' copy, so every later forward
    pruned the old heads."""
    model = fp.patch(tiny_model("llama", num_layers=LAYERS), head_mask={0: [True, False, True, True]})
    state = getattr(model, integration._STATE)
    new_mask = torch.tensor([False, True, True, True])

    class UpdatedWhileRead(dict):
        def get(self, layer, default=None):
            found = super().get(layer, default)
            fp.integrations.update_patch(model, head_mask={0: new_mask})  # (another thread's update lands here)
            return found

    state.set_options(dataclasses.replace(state.options, head_mask=UpdatedWhileRead(state.options.head_mask)))
    state.head_mask(0, torch.device("cpu"), state.options)  # (the forward in flight, with its options)
    assert torch.equal(state.head_mask(0, torch.device("cpu"), state.options), new_mask)


def test_a_forward_running_when_the_model_is_patched_ends_without_a_false_error():
    """A forward that started before another thread patched the model (record_attention opening on
    an unpatched model) ends with the patch's hooks: the safety net took it for a forward that
    never reached fastprobe's attention and raised."""
    reference = tiny_model("llama", num_layers=LAYERS)
    model = copy.deepcopy(reference)
    ids, mask = inputs()

    def patch_meanwhile(module, args, output):  # (another thread's patch, landing mid-forward)
        if not is_patched(model):
            fp.patch(model)

    # (torch runs a model's forward hooks, those added mid-forward too, where it had one when the
    # forward started: a hook of the user's, or the hooks of a patch undone meanwhile)
    own_hook = model.register_forward_hook(lambda module, args, output: None)
    hook = integration.attention_layers(model)[-1].register_forward_hook(patch_meanwhile)  # (no layer after it)
    torch.testing.assert_close(logits(model, ids, mask), logits(reference, ids, mask), rtol=1e-5, atol=1e-5)
    hook.remove()
    own_hook.remove()
    assert is_patched(model)
    real = mask.bool()  # (padded queries' outputs are unspecified: with torch < 2.5 transformers makes them attend to
    # every key, fastprobe gives 0)
    torch.testing.assert_close(logits(model, ids, mask)[real], logits(reference, ids, mask)[real], rtol=1e-5, atol=1e-5)
