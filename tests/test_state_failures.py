"""The patch state of fastprobe.integrations against concurrency: patch and option changes from
other threads leave no broken or stale state behind."""

import copy
import dataclasses
import threading

import pytest
import torch

import fastprobe as fp
from fastprobe.integrations import is_patched
from fastprobe.integrations import transformers as integration
from fastprobe.models import tiny_model

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 3


def inputs(batch=2, length=9):
    ids = torch.randint(3, 500, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # (row 0 left-padded)
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_unpatched_like(model, reference, ids, mask):
    assert not is_patched(model)
    assert model.config._attn_implementation == reference.config._attn_implementation
    assert not model._forward_hooks and not model._forward_pre_hooks
    torch.testing.assert_close(logits(model, ids, mask), logits(reference, ids, mask), rtol=1e-5, atol=1e-5)


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
    state.head_mask(0, torch.device("cpu"))  # (the forward in flight: either mask will do for it)
    assert torch.equal(state.head_mask(0, torch.device("cpu")), new_mask)


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
    torch.testing.assert_close(logits(model, ids, mask), logits(reference, ids, mask), rtol=1e-5, atol=1e-5)
