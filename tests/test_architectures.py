"""fastprobe.patch across the causal-LM families people study, beyond the built-in tiny models
of test_integration (which go deeper on each feature): for each, from a small config of the
installed transformers, a patched model gives the unpatched model's logits on a padded batch, the
same greedy tokens, and recorded sink mass equal to eager attention weights. A family the installed
transformers does not have, or does not route through its attention interfaces, is skipped (the
latter after checking that patch refuses it)."""

import copy

import pytest
import torch

import fastprobe as fp

from .test_integration import TOLERANCE, assert_real_close, eager_sink_mass, inputs, outputs
from .transformers_helpers import patch_or_skip

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

# Sizes every family gets where its config has the field (others keep their defaults).
SMALL = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, n_embd=64, n_layer=2, n_head=4, n_inner=128,
    n_positions=512, ffn_dim=128, word_embed_proj_dim=64, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2, rotary_dim=8,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2, tie_word_embeddings=False,
    attention_dropout=0.0, hidden_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dropout=0.0,
)

# model_type -> what the family is known for (where it differs from Llama), and config extras.
FAMILIES = {
    "gpt_neox": ("Pythia: partial rotary, parallel residual", {}),
    "gptj": ("interleaved partial rotary", {}),
    "phi": ("partial rotary, a dense layer norm layout", {}),
    "phi3": ("fused qkv projection", {}),
    "opt": ("learned positions, no GQA", {}),
    "gemma": ("head_dim independent of hidden size", {}),
    "olmo2": ("q/k norms over all heads", {}),
    "cohere2": ("sliding and global layers, no rotary on global ones", {"sliding_window": 4}),
    "starcoder2": ("a sliding window on every layer, biases", {"sliding_window": 4}),
    "granite": ("attention multiplier as the scale", {"attention_multiplier": 0.3}),
    "mixtral": ("mixture of experts, sliding window", {"sliding_window": 4}),
    "qwen2_moe": ("mixture of experts; an unused sliding mask of window 0", {}),
    "smollm3": ("no rotary on some layers", {}),
    "gpt_bigcode": ("multi-query attention (one kv head)", {"multi_query": True}),
    "codegen": ("qkv split by its own layout", {}),
    "deepseek_v3": ("multi-head latent attention: value heads narrower than query heads",
                    {"qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 16,
                     "q_lora_rank": 16, "n_routed_experts": 4, "n_group": 1, "topk_group": 1,
                     "first_k_dense_replace": 1}),
    "minicpm3": ("multi-head latent attention, a smaller family",
                 {"qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 16,
                  "q_lora_rank": 16}),
    "mimo_v2_flash": ("value heads narrower than query heads (head_dim 16, v_head_dim 8), learned sinks and "
                      "more kv heads on its sliding layers", {"v_head_dim": 8, "sliding_window": 4, "n_routed_experts": 4}),
}


def small_config(model_type: str, extras: dict):
    """A config of model_type with the SMALL sizes it has fields for, layer types re-derived."""
    default = transformers.AutoConfig.for_model(model_type)
    settings = {name: value for name, value in SMALL.items() if hasattr(default, name)}
    if hasattr(default, "kv_lora_rank"):  # latent attention: rotary dims from qk_rope_head_dim, no GQA
        settings.pop("head_dim", None)
        settings["num_key_value_heads"] = settings["num_attention_heads"]
    settings.update(extras)
    if getattr(default, "layer_types", None) is not None:
        settings["layer_types"] = None  # the default lists one type per default layer
    return type(default)(**settings)


def build(model_type: str, extras: dict, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = small_config(model_type, extras)
        return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), **kwargs).eval()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_patched_equals_unpatched(model_type):
    try:
        transformers.AutoConfig.for_model(model_type)
    except ValueError:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    extras = FAMILIES[model_type][1]
    reference, eager = build(model_type, extras), build(model_type, extras, attn_implementation="eager")
    model = patch_or_skip(build(model_type, extras))
    ids, mask = inputs()
    assert_real_close(outputs(model, ids, mask), outputs(reference, ids, mask), mask)
    with torch.no_grad():
        weights = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with fp.record_attention(model) as record:
            model(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(record.sink_mass, eager_sink_mass(weights, mask), **TOLERANCE)
        ids, mask = inputs(padding="left")
        settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **settings), reference.generate(ids, **settings))
