"""What fastprobe reads off a transformers model, and the marks patch() leaves on one: the
self-attention modules and configs, their attention implementation, and the checks that refuse an
architecture whose attention would not run through fastprobe."""

from __future__ import annotations

import inspect
import threading
from typing import Any, Optional

import torch


KEY = "fastprobe"
STATISTICS = ("sink_mass", "group_mass", "entropy")
_STATE = "_fastprobe_state"  # on the patched model and on each of its self-attention modules
# on each self-attention module: its layer index. On the module rather than in a table keyed by the
# module's id, so copies of the module that keep its attributes (copy.deepcopy, pickle, and
# DataParallel's replicas, which share the model's state: options, recorder) find their layer
_LAYER = "_fastprobe_layer"
# id(config) -> (a weak reference to the config, a WeakSet of the _PatchStates of the models whose
# patch switched it); weak: a patched model deleted without unpatch must not be kept alive from here
_SWITCHED: dict = {}
_PATTERN = "_fastprobe_pattern"  # on the key padding masks the mask function returns
# on every module of a patched model (copies keep it, as _LAYER): a module that calls fastprobe's
# attention without being one of its layers (a vision tower's) belongs to a patched model
_PART = "_fastprobe_part"
# Held while patch, unpatch or record_attention change a model's patch state. Two threads patching
# one unpatched model at once both found it unpatched and both hooked it (unpatch then removed one
# pair of hooks, and the other failed every later forward); two entering record_attention on one
# model would both find no recorder and both record. Reentrant: record_attention patches under it.
_PATCHING = threading.RLock()


def _is_cross_attention(module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or "CrossAttention" in type(module).__name__


def _self_attention_modules(model) -> list:
    """The self-attention modules in model order: what transformers' attention modules share
    (an integer layer_idx for the cache and an is_causal flag), cross-attention left out."""
    from transformers import PreTrainedModel

    return [
        module for module in model.modules()
        if not isinstance(module, PreTrainedModel) and isinstance(getattr(module, "layer_idx", None), int)
        and hasattr(module, "is_causal") and not _is_cross_attention(module)
    ]


def unwrapped(model):
    """The transformers model inside the wrappers users hold it in: a PEFT model's base model
    (get_base_model(): its adapters are layers of that model) and torch.compile's module
    (_orig_mod), nested any way; any other object as it is. fastprobe's entry points patch,
    record and read the model inside (through a wrapper's attribute forwarding, a PEFT model
    looked patched while unpatch stripped it half)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # no transformers model to unwrap: the caller says what is missing (_masking_utils)
        return model

    while isinstance(model, torch.nn.Module) and not isinstance(model, PreTrainedModel):
        inner = model._modules.get("_orig_mod")
        if inner is None and hasattr(model, "peft_config") and callable(getattr(type(model), "get_base_model", None)):
            inner = model.get_base_model()
        if not isinstance(inner, torch.nn.Module) or inner is model:
            break
        model = inner
    return model


def execution_device(model) -> torch.device:
    """Where the model computes: its first parameter's device, or for weights offloaded by
    accelerate's hooks (meta placeholders) the first hook's execution device."""
    parameter = next(model.parameters(), None)
    if parameter is None or not parameter.is_meta:
        return torch.device("cpu") if parameter is None else parameter.device
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if isinstance(device, int):  # (an index on the accelerator, as accelerate reads it)
            accelerator = getattr(torch, "accelerator", None)  # (torch >= 2.6)
            found = accelerator.current_accelerator() if accelerator is not None else None
            return torch.device("cuda" if found is None else found.type, device)
        if device is not None:
            return torch.device(device)
    return parameter.device


def attention_layers(model) -> list:
    """fastprobe's layers of a model: its self-attention modules in model order (the rows of
    record_attention's tables and the keys of head_mask)."""
    model = unwrapped(model)
    state = getattr(model, _STATE, None)
    return list(state.layers) if state is not None else _check_architecture(model)


def layer_heads(layers: list) -> list:
    """Each layer's query heads (None where neither the module nor its config says): the module's
    own count first (num_heads, num_attention_heads), then its config's num_attention_heads. A
    vision tower's layers may have other counts than the text model's, and a model with per-layer
    counts keeps them on its modules."""
    def count(module):
        for owner, name in ((module, "num_heads"), (module, "num_attention_heads"),
                            (getattr(module, "config", None), "num_attention_heads")):
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None
    return [count(module) for module in layers]


def _ungrouped_layers(model, layers: list) -> frozenset:
    """The layers whose keys are not the token sequence that key groups describe (the input_ids of
    the forward): a vision or audio tower's that are fastprobe layers (Gemma 4's; their config is
    the model's vision_config or audio_config, their keys an image's patches), and an
    encoder-decoder's decoder layers (T5Gemma's; their config is its decoder config, their keys the
    decoder's tokens)."""
    parts = ("vision", "audio") + (("decoder",) if getattr(model.config, "is_encoder_decoder", False) else ())
    ungrouped = {id(getattr(config, name)) for config in _configs(model)
                 for name in getattr(config, "sub_configs", {}) or {}
                 if name.startswith(parts) and getattr(config, name, None) is not None}
    return frozenset(index for index, module in enumerate(layers) if id(getattr(module, "config", None)) in ungrouped)


def _configs(model) -> list:
    """Every config the model's attention dispatch reads: its own, nested sub-configs (e.g. a VLM's
    text_config) and those of sub-models, each once."""
    from transformers import PreTrainedModel

    found, queue = {}, [model.config]
    queue += [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while queue:
        config = queue.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        queue += [getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {}]
        queue = [c for c in queue if c is not None]
    return list(found.values())


def _implementation(config) -> Optional[str]:
    return getattr(config, "_attn_implementation_internal", getattr(config, "_attn_implementation", None))


def _write_implementation(config, implementation: Optional[str]) -> None:
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = implementation
    else:  # no internal attribute: the public property setter
        config._attn_implementation = implementation


def _layer_config(module, model):
    """The config a self-attention module dispatches on."""
    return getattr(module, "config", model.config)


def _switch(model, layers: list, configs: list) -> None:
    """Switches the model and its sub-models (every config in `configs`) to "fastprobe"."""
    if not hasattr(model, "set_attn_implementation"):  # transformers 4.53; its sub-models hold copies of sub-configs
        for config in configs:
            _write_implementation(config, KEY)
        return
    model.set_attn_implementation(KEY)
    if all(_layer_config(m, model) is not model.config for m in layers):
        # a wrapper with no attention code of its own (LLaVA's): 4.54-4.55 leave its config, 4.56+ switch it
        _write_implementation(model.config, KEY)


def _live_states(config) -> Any:
    """The _PatchStates of the live patches that switched this config object (several models may
    share one config), or ()."""
    config_ref, states = _SWITCHED.get(id(config), (None, ()))
    return states if config_ref is not None and config_ref() is config else ()


def _implementation_before_fastprobe(config) -> Optional[str]:
    """The config's attention implementation as it was before any live patch switched it: its own,
    or, where the patch of another model sharing the config switched it, what that one restores."""
    for other in _live_states(config):
        for known, implementation in other.previous:
            if known is config:
                return implementation
    return _implementation(config)


def _restore(previous: list) -> None:
    """Writes each config's previous implementation back. Done per config, not through
    set_attn_implementation(previous): that re-validates (sdpa may turn into eager) and spreads one
    value over sub-configs that may have differed."""
    for config, implementation in previous:
        _write_implementation(config, implementation)


def _refuse(model, why: str, consequence: str = "Its attention would not run through fastprobe, so it is refused "
                                                 "rather than left silently unpatched.") -> NotImplementedError:
    return NotImplementedError(f"fastprobe cannot patch {type(model).__name__}: {why}. {consequence}")


def _check_architecture(model) -> list:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"fastprobe.patch takes a transformers PreTrainedModel, got {type(model).__name__}")
    # (named as attention, or dispatching through the interface under another name: LongCat-Flash's MLA)
    attention_like = sorted({type(m).__name__ for m in model.modules() if not isinstance(m, PreTrainedModel)
                             and (_named_attention(type(m)) or _calls_interface(type(m)))})
    no_attention = _refuse(model, "it has no attention layers (in this configuration all its layers are recurrent, "
                                  "state-space, convolutional or linear attention)",
                           "There is nothing for fastprobe's attention to run.")
    if not attention_like:
        raise no_attention
    # The flag transformers sets on models whose attention goes through the AttentionInterface.
    flagged = getattr(type(model), "_supports_attention_backend", False)
    if not flagged and not _hybrid_family(model):
        raise _refuse(model, "transformers does not mark it as running its attention through the AttentionInterface "
                             "(the class does not set _supports_attention_backend)")
    unmarked = _unmarked_sub_model(model)
    if unmarked is not None:  # BLIP-2's T5 language model, a LLaVA's data2vec-vision tower
        raise _refuse(model, f"its {unmarked[0]} ({unmarked[1]}) has attention of its own, and transformers does not "
                             "mark that class as running it through the AttentionInterface (it does not set "
                             "_supports_attention_backend)")
    # transformers 4.53's GPT-2, Kosmos-2 (and other models not on masking_utils) build their own 4D masks:
    # looked for on every module, not only sub-models (5.0's Kosmos2TextTransformer is a plain nn.Module)
    own_masks = sorted({f"{type(m).__name__} ({method})" for m in model.modules()
                        for method in _OWN_MASK_METHODS if hasattr(type(m), method)})
    if own_masks:
        raise _refuse(model, f"{', '.join(own_masks)} builds its own [L, L] masks instead of asking transformers' "
                             "AttentionMaskInterface")
    layers = _self_attention_modules(model)
    if not layers:
        # Doge: a layer_idx but no is_causal (its attention adds a dynamic mask of its own)
        softmax = [m for m in model.modules() if _named_attention(type(m)) and _calls_interface(type(m))]
        if _hybrid_family(model) and not softmax:  # (Kimi Linear of delta-attention layers alone)
            raise no_attention
        undeclared = sorted({type(m).__name__ for m in softmax
                             if isinstance(getattr(m, "layer_idx", None), int) and not hasattr(m, "is_causal")})
        if undeclared:
            raise _refuse(model, f"{', '.join(undeclared)} does not declare is_causal, so fastprobe cannot tell how "
                                 "it masks its keys")
        raise _refuse(model, f"none of its attention modules ({', '.join(attention_like)}) is a language model's "
                             "self-attention layer (a module with layer_idx and is_causal), which is what fastprobe "
                             "patches: a model without one (a vision or audio encoder, a DistilBERT-style text "
                             "encoder) is not supported on its own (a vision-language model's tower runs through "
                             "fastprobe beside its language model)", "There would be no layer to patch or record.")
    bypassing = [] if flagged else [type(m).__name__ for m in layers if not _calls_interface(type(m))]
    if bypassing:
        raise _refuse(model, f"{', '.join(sorted(set(bypassing)))} does not dispatch through transformers' "
                             "AttentionInterface (ALL_ATTENTION_FUNCTIONS)")
    merged = sorted({type(m).__name__ for m in layers if _attends_to_another_sequence(type(m))})
    if merged:  # T5Gemma 2's decoder: keys [its own tokens, the encoder's], under one concatenated mask
        raise _refuse(model, f"{', '.join(merged)} attends to its own tokens and another sequence's (the encoder's) "
                             "in one call, under a mask concatenated from both, which fastprobe's causal and padding "
                             "patterns do not describe", "It is refused rather than run under the wrong mask.")
    # DeepSeek-V3.2, GLM-MoE-DSA, GLM-5-Next, Qwen4-Exp: an indexer picks each query's keys
    sparse = sorted({type(m).__name__ for m in layers if getattr(m, "indexer", None) is not None})
    if sparse:
        raise _refuse(model, f"{', '.join(sparse)} attends to the keys its indexer selects for each query (sparse "
                             "attention), which fastprobe does not reproduce")
    return layers


# Methods of models that build their own 4D masks rather than asking the AttentionMaskInterface
_OWN_MASK_METHODS = ("_update_causal_mask", "_prepare_decoder_attention_mask")


def _unmarked_sub_model(model) -> Optional[tuple]:
    """(path, class name) of the first sub-model with attention modules of its own (not those of
    a sub-model inside it) whose class transformers does not mark as dispatching attention
    through the AttentionInterface, or None: a marked model may hold an unmarked one (BLIP-2 a T5
    language model, whose position bias fastprobe cannot add; a LLaVA a data2vec-vision tower,
    whose attention would bypass fastprobe). The parts of a hybrid family's model (Qwen 3.5's
    vision model) are unmarked as the model is, and dispatch through the interface as it does."""
    from transformers import PreTrainedModel

    hybrid = _hybrid_family(model)

    def first_unmarked(module, path: str) -> Optional[tuple]:
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if isinstance(child, PreTrainedModel):
                unmarked = not (getattr(type(child), "_supports_attention_backend", False) or hybrid
                                or _hybrid_family(child))
                if unmarked and has_own_attention(child):
                    return child_path, type(child).__name__
            found = first_unmarked(child, child_path)
            if found is not None:
                return found
        return None

    def has_own_attention(module) -> bool:
        return any(not isinstance(child, PreTrainedModel)
                   and (_named_attention(type(child)) or has_own_attention(child)) for child in module.children())

    return first_unmarked(model, "")


def _attends_to_another_sequence(module_class) -> bool:
    """Whether an attention module's forward requires another sequence's states (no default):
    self- and cross-attention merged in one call (T5Gemma 2's decoder). Modules that only may
    take them (GPT-2's, a cross-attention instance of the same class) have a default None."""
    try:
        parameters = inspect.signature(inspect.unwrap(module_class.forward)).parameters
    except (TypeError, ValueError):
        return False
    return any(parameters[name].default is inspect.Parameter.empty for name in
               ("encoder_hidden_states", "key_value_states", "cross_attention_states") if name in parameters)


def _named_attention(cls) -> bool:
    """Whether a module class is named as attention (LlamaAttention, GPT2Attention, MultiheadAttn...)."""
    name = cls.__name__.lower()
    return "attention" in name or "attn" in name


# Decoder families whose attention layers dispatch through the AttentionInterface though their
# classes do not set _supports_attention_backend: hybrids of attention layers with linear-attention
# or state-space layers (the latter are not attention to fastprobe: they run as they are). Each
# is checked against SDPA in tests/test_architectures.py (HYBRIDS); its attention modules must
# also name ALL_ATTENTION_FUNCTIONS (_calls_interface).
_HYBRID_FAMILIES = frozenset({
    "bamba", "falcon_h1", "jamba", "kimi_linear", "nemotron_h", "olmo_hybrid", "qwen3_5", "qwen3_5_text", "qwen3_5_moe",
    "qwen3_5_moe_text", "qwen3_next", "zamba2",
})


def _hybrid_family(model) -> bool:
    """Whether a decoder-only model (its own config, not an encoder-decoder's) is of _HYBRID_FAMILIES."""
    config = model.config
    return not getattr(config, "is_encoder_decoder", False) and getattr(config, "model_type", None) in _HYBRID_FAMILIES


def _calls_interface(module_class) -> bool:
    """Whether an attention module's forward (under its decorators) looks its attention up in
    transformers' ALL_ATTENTION_FUNCTIONS."""
    forward = inspect.unwrap(module_class.forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names
