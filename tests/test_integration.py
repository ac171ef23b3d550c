"""fastprobe.patch / unpatch / record_attention on real transformers models built from small
configs (float32, 2 layers, hidden 64; no downloads): patched outputs and greedy generations
equal the unpatched model's, recorded statistics equal eager attention weights, windows and
sinks match transformers' own masks, and what fastprobe cannot reproduce is refused."""

import copy
import inspect
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastprobe as fp
from fastprobe.integrations import attention_layers, is_patched, patch_options, update_patch
from fastprobe.integrations import _attention, _lookups, _masks
from fastprobe.integrations import transformers as integration
from fastprobe.models import ARCHITECTURES, tiny_config, tiny_model

from .conftest import TORCH_RELEASE
from .transformers_helpers import (assert_same_greedy, cached_keys_values, generated_cache, patch_or_skip,
                                  routes_through_interfaces, skip_without_compile_reference, unpatched_or_skip)

transformers = pytest.importorskip("transformers")

CAUSAL = [arch for arch in ARCHITECTURES if arch != "bert"]
VOCAB = 512
LENGTH = 12  # longer than the sliding windows (4) of Mistral, Gemma 2/3 and Qwen2's second layer
TOLERANCE = dict(rtol=2e-5, atol=2e-5)


pytestmark = pytest.mark.usefixtures("one_thread")
TORCH_BEFORE_2_6 = TORCH_RELEASE < (2, 6)
PACKING_NEEDS_TORCH_2_6 = ("transformers reads packed sequences from position ids only with torch >= 2.6 (before, the "
                           "unpatched model attends across them, or its sliding-window mask fails on them)")


def inputs(batch=3, length=LENGTH, padding="mixed"):
    """input_ids and an attention mask: row 0 left-padded, row 1 right-padded, row 2 full
    ("mixed"); "left" pads rows 0 and 1 on the left; "none" has no padding."""
    ids = torch.randint(3, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    if padding in ("mixed", "left"):
        mask[0, :5] = 0
    if padding == "mixed":
        mask[1, length - 3:] = 0
    if padding == "left":
        mask[1, :2] = 0
    return ids, mask


def outputs(model, ids, mask, **kwargs):
    with torch.no_grad():
        result = model(input_ids=ids, attention_mask=mask, **kwargs)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def assert_real_close(got, want, mask, **tolerance):
    """Equal at real (non-padded) positions: padded queries' outputs are unspecified."""
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **(tolerance or TOLERANCE))


def first_real(mask):
    return mask.to(torch.int64).argmax(-1)


def eager_sink_mass(attentions, mask, chunked=False):
    """[layers, heads] weight on each row's first real key, averaged over real queries and rows,
    from eager attention weights [B, H, Lq, Lk] (prefill: Lq = Lk). chunked (Llama 4): on each
    query's first visible key, the first real key of its chunk (a segment of its own)."""
    real = mask.bool()
    rows = []
    for weights in attentions:
        batch, heads, queries, _ = weights.shape
        on_first = weights.gather(-1, first_keys(weights, mask, chunked))[..., 0]
        rows.append((on_first * real[:, None]).sum((0, 2)) / real.sum())
    return torch.stack(rows)


def first_keys(weights, mask, chunked):
    """[B, H, Lq, 1] index of the key whose weight is sink_mass: the row's first real key, or with
    chunked the query's first key of nonzero weight (the keys a query sees all have some)."""
    if chunked:
        return (weights > 0).to(torch.int8).argmax(-1, keepdim=True)
    return first_real(mask).view(-1, 1, 1, 1).expand(*weights.shape[:3], 1)


# ---------------------------------------------------------------- same outputs as unpatched


@pytest.mark.parametrize("padding", ["mixed", "none", "no mask"])  # "no mask": attention_mask=None (no padding)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_patched_prefill_matches_unpatched(arch, padding):
    reference, model = tiny_model(arch), patch_or_skip(tiny_model(arch))
    assert model.config._attn_implementation == "fastprobe"
    ids, mask = inputs(padding="none" if padding == "no mask" else padding)
    if padding == "no mask":
        # (torch < 2.5: transformers' own SDPA mask for a sliding window or chunks, built without an attention
        # mask for a batch, fails: sdpa_mask_older_torch writes in place into an expanded tensor. An all-ones
        # mask is the same mask for the reference; the patched model still runs without one.)
        reference_mask = None if TORCH_RELEASE >= (2, 5) else torch.ones_like(ids)
        assert_real_close(outputs(model, ids, None), outputs(reference, ids, reference_mask), mask)
        return
    want = outputs(reference, ids, mask)
    if padding != "none" and TORCH_RELEASE < (2, 5) and _padding_reaches_real_tokens(reference, ids, mask, want):
        pytest.skip(f"transformers {transformers.__version__}'s {arch} carries padded tokens into real ones, "
                    "and with torch < 2.5 transformers makes a padded query with no visible key attend to every key "
                    "(fastprobe gives it 0): the real outputs differ by what the padding held")
    assert_real_close(outputs(model, ids, mask), want, mask)


def _padding_reaches_real_tokens(model, ids, mask, real_outputs) -> bool:
    """Whether the model's outputs at real positions change with the padded tokens' ids (transformers
    4.55's Llama 4 mixes them in; 4.57's does not)."""
    other_ids = torch.where(mask.bool(), ids, (ids + 1) % VOCAB)
    real = mask.bool()
    return not torch.equal(outputs(model, other_ids, mask)[real], real_outputs[real])


@pytest.mark.parametrize("arch", CAUSAL)
def test_patched_generate_is_identical(arch):
    """Greedy decoding with a KV cache, left padding, past the sliding windows (so Mistral's and
    Gemma's sliding caches drop tokens): the same tokens (but at a near tie: assert_same_greedy)."""
    reference, model = tiny_model(arch), patch_or_skip(tiny_model(arch))
    ids, mask = inputs(padding="left")
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True)
    with torch.no_grad():
        want = reference.generate(ids, **settings)
        got = model.generate(ids, **settings)
    assert_same_greedy(got, want, **TOLERANCE)


# ---------------------------------------------------------------- static caches


STATISTICS = ("sink_mass", "group_mass", "entropy")


def static_generate(model, ids, **settings):
    """generate with a static cache (the compiled-decoding cache); None where transformers' own
    generate fails on it (5.17's Llama 4: create_chunked_causal_mask gets block_sequence_ids)."""
    try:
        with torch.no_grad():
            return model.generate(ids, cache_implementation="static", output_scores=True, return_dict_in_generate=True,
                                  **settings)
    except TypeError as why:
        if "unexpected keyword argument" not in str(why):
            raise
        return None


@pytest.mark.parametrize("arch", CAUSAL)
def test_static_cache_generate_matches_unpatched(arch):
    """generate(cache_implementation="static"): the cache hands attention its whole buffer (keys past
    the tokens unwritten) and, for full-attention layers, the query offset as a tensor. Left padding,
    past the sliding windows (their static layers roll): each step's scores as the unpatched model's
    with the same cache, and the same tokens."""
    reference, model = tiny_model(arch), patch_or_skip(tiny_model(arch))
    ids, mask = inputs(padding="left")
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = static_generate(reference, ids, **settings)
    if want is None:
        pytest.skip(f"transformers {transformers.__version__}'s generate fails on {arch} with a static cache")
    got = static_generate(model, ids, **settings)
    assert_same_greedy(got, want, **TOLERANCE)


def test_gemma_checkpoints_hybrid_cache():
    """Gemma 2 and 3 checkpoints ship generation_config.cache_implementation = "hybrid" (a static
    cache with sliding layers), so their plain generate() used it and a patched one was refused."""
    reference, model = tiny_model("gemma2"), fp.patch(tiny_model("gemma2"))
    for net in (reference, model):
        net.generation_config.cache_implementation = "hybrid"
    ids, mask = inputs(padding="left")
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True)
    with torch.no_grad():
        want, got = (net.generate(ids, **settings) for net in (reference, model))
    assert_same_greedy(got, want, **TOLERANCE)


@pytest.mark.parametrize("arch,options", [("llama", dict(num_sink=1, window=6)), ("mistral", {})])
def test_static_cache_records_and_honours_options_as_a_dynamic_cache(arch, options):
    """The same statistics, and the same outputs with sinks and a window (full layers; Mistral's
    sliding layers, of window 4, drop the sinks), as with a dynamic cache: the unwritten slots are
    no keys."""
    model = fp.patch(tiny_model(arch), **options)
    ids, mask = inputs(padding="left")
    settings = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                    output_scores=True, return_dict_in_generate=True)
    groups, runs = torch.randint(0, 3, ids.shape), []
    for cache in ("static", None):
        with torch.no_grad(), fp.record_attention(model, key_groups=groups, statistics=STATISTICS) as record:
            result = model.generate(ids, cache_implementation=cache, **settings)
        runs.append((result, record))
    (static, static_record), (dynamic, dynamic_record) = runs
    for static_scores, dynamic_scores in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(static_scores, dynamic_scores, **TOLERANCE)
    for statistic in STATISTICS:
        torch.testing.assert_close(getattr(static_record, statistic), getattr(dynamic_record, statistic), **TOLERANCE)
    assert static_record.num_queries.tolist() == dynamic_record.num_queries.tolist()


def test_static_cache_in_chunks_and_without_a_mask():
    """A static cache filled by direct calls: a prefill in two chunks (queries at a tensor offset
    > 0, the offset read) and decoding steps, with and without an attention mask; as unpatched."""
    reference, model = tiny_model("llama"), fp.patch(tiny_model("llama"))
    ids, full_mask = inputs(padding="left", length=LENGTH + 3)  # the last 3 decoded: drawn, the same for both
    steps = [(0, 7), (7, LENGTH)] + [(LENGTH + i, LENGTH + i + 1) for i in range(3)]
    # (transformers 5.x names it cache, and deprecates past_key_values)
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run(net, with_mask):
        cache = transformers.StaticCache(config=net.config, max_cache_len=LENGTH + 4, max_batch_size=ids.shape[0])
        logits = []
        with torch.no_grad():
            for start, end in steps:
                kwargs = dict(attention_mask=full_mask[:, :end]) if with_mask else {}
                kwargs[cache_argument] = cache
                out = net(input_ids=ids[:, start:end], use_cache=True,
                          position_ids=torch.arange(start, end)[None].expand(ids.shape[0], -1), **kwargs)
                logits.append(out.logits)
        return logits

    # (torch < 2.5: transformers' own static-cache mask without an attention mask fails)
    for with_mask in (True, False) if TORCH_RELEASE >= (2, 5) else (True,):
        for (start, end), got, want in zip(steps, run(model, with_mask), run(reference, with_mask), strict=True):
            real = full_mask[:, start:end].bool() if with_mask else torch.ones(got.shape[:2], dtype=torch.bool)
            torch.testing.assert_close(got[real], want[real], **TOLERANCE)  # (padded queries: unspecified)


@skip_without_compile_reference
@pytest.mark.skipif(TORCH_BEFORE_2_6, reason="torch.compile of transformers' generate needs a recent torch")
@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # one mask for every layer; masks by layer type
def test_compiled_decoding_with_a_static_cache(arch):
    """generate's own torch.compile of the decoding step (a static cache; here the aot_eager backend on
    CPU): the unpatched model's tokens, and from transformers 5 (4.5x breaks in its own attention
    lookup) not one graph break: the masks generate makes ahead keep their pattern inside the compiled
    forward, and nothing reads the query offset on the host."""
    from torch._dynamo.utils import counters

    reference, model = tiny_model(arch), fp.patch(tiny_model(arch))
    ids, mask = inputs(padding="left")
    settings = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    want = static_generate(reference, ids, **settings)
    config = transformers.CompileConfig(backend="aot_eager", mode=None, fullgraph=False, dynamic=None)
    config._compile_all_devices = True  # (generate compiles on accelerators only, unless told)
    torch._dynamo.reset()
    counters.clear()
    got = static_generate(model, ids, compile_config=config, **settings)
    assert counters["stats"]["unique_graphs"] > 0  # it did compile
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()
    assert_same_greedy(got, want, **TOLERANCE)


@skip_without_compile_reference
@pytest.mark.skipif(TORCH_BEFORE_2_6, reason="torch.compile of transformers' generate needs a recent torch")
@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="transformers 4.5x breaks in its attention "
                    "lookup (a graph per step there anyway)")
@pytest.mark.parametrize("padding", ["left", "none"])
def test_compiled_decoding_records_without_a_graph_per_step(padding):
    """generate's compiled decoding step (a static cache) while recording: Dynamo compiles the step
    once, not once per step. The record's count of calls was a Python int that the compiled step
    read and incremented (a guard on its value: a recompile every step until Dynamo's recompile
    limit, 8, after which the steps ran eagerly), and the mask, one slot wider each step, got a
    graph for its first width. The step that fills the buffer's last slot may add one graph (its
    written keys are the whole buffer: AOTAutograd's contiguity check of that view guards on the
    width, a torch guard); with 9 steps, at most 2 graphs. The statistics are the uncompiled run's."""
    from torch._dynamo.utils import counters

    model = fp.patch(tiny_model("llama"))
    ids, mask = inputs(padding=padding)
    settings = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with fp.record_attention(model, statistics=("sink_mass", "entropy")) as want:
        expected = static_generate(model, ids, **settings)
    config = transformers.CompileConfig(backend="aot_eager", mode=None, fullgraph=False, dynamic=None)
    config._compile_all_devices = True  # (generate compiles on accelerators only, unless told)
    torch._dynamo.reset()
    counters.clear()
    try:
        with fp.record_attention(model, statistics=("sink_mass", "entropy")) as got:
            generated = static_generate(model, ids, compile_config=config, **settings)
        graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert 0 < graphs <= 2 and not breaks, (graphs, breaks)
    assert torch.equal(generated.sequences, expected.sequences)
    torch.testing.assert_close(got.sink_mass, want.sink_mass, **TOLERANCE)
    torch.testing.assert_close(got.entropy, want.entropy, **TOLERANCE)
    assert got.num_queries.tolist() == want.num_queries.tolist()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2"])
def test_patched_model_under_autocast(arch):
    """Mixed precision (a float32 model under torch.autocast): the rotary embedding hands
    attention float32 q and k with a bfloat16 v, which SDPA and eager attention take; so does
    fastprobe (it used to refuse the mixed dtypes). Logits as the unpatched model's under
    autocast, the same greedy tokens, and the statistics of the float32 run within bfloat16's
    precision. Decoding (greedy tokens can tie at bfloat16's resolution): each step's scores as
    the unpatched model's logits at that position of the generated sequences."""
    reference, model = tiny_model(arch), patch_or_skip(tiny_model(arch))
    ids, mask = inputs(padding="left")
    new_tokens = 6
    with fp.record_attention(model) as full_precision:
        outputs(model, ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = outputs(reference, ids, mask)
        with fp.record_attention(model) as record:
            got = outputs(model, ids, mask)
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        sequences = generated.sequences
        whole_mask = torch.cat([mask, torch.ones(len(ids), sequences.shape[1] - LENGTH, dtype=mask.dtype)], 1)
        want_scores = outputs(reference, sequences, whole_mask)[:, LENGTH - 1:-1]
    assert got.dtype == want.dtype == torch.bfloat16
    # logits below 1 here: bfloat16's step is 2^-8 there, the largest difference seen 1.6 steps
    assert_real_close(got.float(), want.float(), mask, rtol=0, atol=0.02)
    assert sequences.shape[1] == LENGTH + new_tokens
    torch.testing.assert_close(torch.stack(generated.scores, 1).float(), want_scores.float(), rtol=0, atol=0.02)
    # a mass in [0, 1]: one bfloat16 step at 1 (differences seen: 3e-5)
    torch.testing.assert_close(record.sink_mass, full_precision.sink_mass, rtol=0, atol=2 ** -8)


def test_gpt_oss_learned_sinks():
    """gpt-oss passes its per-head sink logits as s_aux: the kernel's sink_logit."""
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no gpt-oss (it arrived in 4.55)")
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
    )
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.self_attn.sinks.normal_()  # make the sinks matter
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()  # patch switches its config
    model.load_state_dict(reference.state_dict())
    fp.patch(model)
    assert reference.config._attn_implementation != "fastprobe"
    ids, mask = inputs(padding="left")
    assert_real_close(outputs(model, ids, mask), outputs(reference, ids, mask), mask)
    with torch.no_grad():
        settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                        return_dict_in_generate=True)
        assert_same_greedy(model.generate(ids, **settings), reference.generate(ids, **settings), **TOLERANCE)


def small_llava_config():
    """A LLaVA config: a CLIP vision tower (28 x 28 images, 2 x 2 patches) and a Llama text model,
    image token 299."""
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=28, patch_size=14)
    text = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text, image_token_index=299,
                                    vision_feature_layer=-1)


def _vlm_case(name):
    """(model class, config, image inputs) of a small vision-language model of family `name`, or a
    skip when the installed transformers has none."""
    classes = dict(llava_next="LlavaNext", llava_onevision="LlavaOnevision", mistral3="Mistral3", idefics3="Idefics3",
                   internvl="InternVL", smolvlm="SmolVLM", aya_vision="AyaVision", lfm2_vl="Lfm2Vl", llama4="Llama4")
    prefix = classes[name]
    if not hasattr(transformers, f"{prefix}ForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no {prefix}")
    model_class, config_class = (getattr(transformers, f"{prefix}{suffix}") for suffix in ("ForConditionalGeneration", "Config"))
    text = dict(model_type="qwen2" if name in ("internvl", "llava_onevision") else "llama", vocab_size=300, hidden_size=64,
                intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    pinpoints = dict(image_grid_pinpoints=[[28, 28], [28, 56]], vision_feature_layer=-1)
    sizes = torch.tensor([[28, 56], [28, 28]])  # anyres: one wide image, one square
    if name == "llava_next":
        config = config_class(vision_config=transformers.CLIPVisionConfig(**tower, image_size=28, patch_size=14).to_dict(),
                              text_config=text, image_token_index=299, **pinpoints)
        images = dict(pixel_values=torch.randn(2, 3, 3, 28, 28), image_sizes=sizes)
    elif name == "llava_onevision":
        config = config_class(vision_config=dict(model_type="siglip_vision_model", **tower, image_size=28, patch_size=14),
                              text_config=text, image_token_index=299, **pinpoints)
        images = dict(pixel_values=torch.randn(2, 3, 3, 28, 28), image_sizes=sizes)
    elif name == "mistral3":  # Pixtral packs the images in one row under a block-diagonal 4D mask
        config = config_class(vision_config=dict(model_type="pixtral", **tower, image_size=28, patch_size=7, head_dim=8),
                              text_config=dict(text, model_type="mistral", head_dim=16), image_token_index=299,
                              spatial_merge_size=2, vision_feature_layer=-1)
        images = dict(pixel_values=torch.randn(2, 3, 28, 28), image_sizes=torch.tensor([[28, 28], [28, 28]]))
    elif name in ("idefics3", "smolvlm"):  # 4 tokens per image, a multiple of patch_size: SmolVLM's merger in
        # transformers 5.20.2 (the newest for Python 3.10) takes them in groups of vision patch_size
        config = config_class(vision_config=dict(**tower, image_size=16, patch_size=4), text_config=text,
                              image_token_id=299, scale_factor=2)
        images = dict(pixel_values=torch.randn(2, 1, 3, 16, 16))
    elif name == "aya_vision":
        config = config_class(vision_config=dict(model_type="siglip_vision_model", **tower, image_size=28, patch_size=7),
                              text_config=dict(text, model_type="cohere2"), image_token_index=299,
                              downsample_factor=2, vision_feature_layer=-1)
        images = dict(pixel_values=torch.randn(2, 3, 28, 28))
    elif name == "lfm2_vl":
        config = config_class(vision_config=dict(model_type="siglip2_vision_model", **tower, patch_size=7,
                                                 num_patches=16), text_config=dict(text, model_type="lfm2"),
                              image_token_id=299, downsample_factor=2)
        images = dict(pixel_values=torch.randn(2, 16, 3 * 7 * 7),
                      pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
                      spatial_shapes=torch.tensor([[4, 4], [4, 4]]))
    elif name == "llama4":  # a chunked-attention layer and a NoPE full one, a pixel-shuffle projector
        vision = dict(tower, intermediate_size=128, image_size=28, patch_size=7, vision_output_dim=32,
                      projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5)
        config = config_class(vision_config=vision, text_config=dict(text, head_dim=16, intermediate_size_mlp=128,
                                                                     num_local_experts=2, attention_chunk_size=8,
                                                                     no_rope_layers=[1, 0], pad_token_id=0),
                              image_token_index=299)
        if not hasattr(config, "pad_token_id"):  # (5.0's Llama4Config has none, which its model reads: also unpatched)
            config.pad_token_id = None
        images = dict(pixel_values=torch.randn(2, 3, 28, 28))
    else:
        config = config_class(vision_config=dict(**tower, image_size=[28, 28], patch_size=[7, 7]), text_config=text,
                              image_token_id=299, downsample_ratio=0.5, vision_feature_layer=-1)
        images = dict(pixel_values=torch.randn(2, 3, 28, 28))
    return model_class, config, images


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision", "mistral3", "idefics3", "internvl", "smolvlm",
                                  "aya_vision", "lfm2_vl", "llama4"])
def test_vision_language_models_with_images(name):
    """Vision-language families with images in a left-padded batch: the patched model's logits and
    greedy tokens are the unpatched ones (their vision towers attend without fastprobe options;
    Pixtral's block-diagonal mask over packed images runs image by image)."""
    model_class, config, images = _vlm_case(name)
    models = []
    for _ in range(2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            models.append(model_class(copy.deepcopy(config)).eval())
    reference, model = models[0], patch_or_skip(models[1])
    with torch.no_grad():
        select = {}  # (Llama 4's before 5.2x takes these by name; 4.53's has no defaults for them)
        if name == "llama4":
            select = {"vision_feature_select_strategy": "default"}
            if hasattr(config.vision_config, "vision_feature_layer"):  # (4.5x)
                select["vision_feature_layer"] = config.vision_config.vision_feature_layer
        features = getattr(reference, "model", reference).get_image_features(**images, **select)
    pooled = getattr(features, "pooler_output", features)
    features = features.last_hidden_state if pooled is None else pooled  # Llama 4 pools nothing
    if isinstance(features, torch.Tensor):  # [images, tokens, hidden], or flattened over the images
        features = features.reshape(2, -1, features.shape[-1])
    counts = [len(f) for f in features]  # image tokens per image
    length = max(counts) + 8
    ids, mask = torch.randint(3, 290, (2, length)), torch.ones(2, length, dtype=torch.long)
    for row, count in enumerate(counts):
        pad = length - count - 6
        ids[row, :pad], mask[row, :pad] = 0, 0
        ids[row, pad + 2:pad + 2 + count] = 299
    want = unpatched_or_skip(lambda: outputs(reference, ids, mask, **images), model_class.__name__)
    assert_real_close(outputs(model, ids, mask, **images), want, mask)
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True, **images)
    with torch.no_grad():
        assert_same_greedy(model.generate(ids, **settings), reference.generate(ids, **settings), **TOLERANCE)
    # contrastive guidance on every layer, image keys tracked from the image token: gamma 0 is
    # plain attention, gamma 1 moves the guided (last real) rows
    fp.patch(model, guidance=dict(gamma=0.0, layers=[0, 1], image_token_id=299))
    assert_real_close(outputs(model, ids, mask, **images), want, mask)
    fp.patch(model, guidance=dict(gamma=1.0, layers=[0, 1], image_token_id=299))
    assert (outputs(model, ids, mask, **images)[:, -1] - want[:, -1]).abs().max() > 1e-3


def gemma4_vision_language_models(count: int, vision_heads: int = 4, vocab_size: int = 300) -> list:
    """count identical small Gemma 4 vision-language models (use_bidirectional_attention="vision":
    each image's tokens see each other both ways; sliding and full layers, the last two sharing
    earlier layers' keys and values; a one-layer vision tower whose attention is a fastprobe layer)."""
    if not hasattr(transformers, "Gemma4ForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 4")
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16, pad_token_id=0,
                num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2,
                use_bidirectional_attention="vision")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=vision_heads,
                  num_key_value_heads=vision_heads, head_dim=8, patch_size=4, pooling_kernel_size=2, position_embedding_size=64)
    models = []
    for _ in range(count):
        config = transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=299,
                                           boi_token_id=297, eoi_token_id=298)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            models.append(transformers.Gemma4ForConditionalGeneration(config).eval())
    return models


# Gemma 4's vision tower and text stack against its unpatched sdpa logits: float32 rounding reaches
# 2.3e-5 on logits of about 0.6 (seed 1933342511: fastprobe 1.4e-5 and sdpa 7.8e-6 from float64; 1e-6
# to 9e-6 on other seeds), past TOLERANCE; dropping the image blocks moves them by up to ~0.5
GEMMA4_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def gemma4_inputs() -> tuple:
    """input_ids, attention mask and image arguments for gemma4_vision_language_models: two rows
    (5 and 2 left-padded tokens), an image of 4 tokens in each."""
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1).reshape(16, 2)
    images = dict(pixel_values=torch.rand(2, 16, 3 * 4 * 4), image_position_ids=grid.expand(2, 16, 2).clone())
    ids, mask = inputs(batch=2, length=16, padding="left")
    ids = ids % 290
    ids[:, 6], ids[:, 7:11], ids[:, 11] = 297, 299, 298  # <start_of_image>, 4 image tokens, <end_of_image>
    images["mm_token_type_ids"] = (ids == 299).long()
    return ids, mask, images


def test_gemma4_vision_tokens_attend_both_ways():
    """Gemma 4's blockwise overlay (5.x; each image's tokens see each other both ways, on sliding and
    full layers, some sharing earlier layers' keys and values), or in releases before the overlay
    (5.8) its own image-group function on the sliding layers: patched, the logits and greedy
    tokens are the unpatched ones (dropping the blocks moves the logits by up to ~0.5)."""
    reference, model = gemma4_vision_language_models(2)
    model = patch_or_skip(model)
    ids, mask, images = gemma4_inputs()
    want = unless_masks_need_newer_torch(lambda: outputs(reference, ids, mask, **images))
    assert_real_close(outputs(model, ids, mask, **images), want, mask, **GEMMA4_TOLERANCE)
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True, **images)
    with torch.no_grad():
        assert_same_greedy(model.generate(ids, **settings), reference.generate(ids, **settings), **GEMMA4_TOLERANCE)


def test_gemma4_guidance_leaves_its_vision_tower_alone():
    """Gemma 4's vision tower attention is a fastprobe layer (layer 0, not causal): guidance's
    default layers are the causal ones (its language model's), and naming the tower's is refused
    (the image-key mask is over the token sequence, not over patches; at equal lengths it was
    silently applied there, and generate, which runs the tower before the forward in 5.2x, failed).
    gamma = 0 gives the unpatched logits and tokens; gamma = 1 moves only each row's last logits."""
    reference, model = gemma4_vision_language_models(2)
    model = patch_or_skip(model)
    layers = attention_layers(model)
    assert [module.is_causal for module in layers] == [False] + [True] * 4
    with pytest.raises(ValueError, match=r"layer 0 \(Gemma4VisionAttention\), which is not causal"):
        fp.patch(model, guidance=dict(gamma=1.0, layers=[0, 1]))
    ids, mask, images = gemma4_inputs()
    want = unless_masks_need_newer_torch(lambda: outputs(reference, ids, mask, **images))
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True, **images)
    with torch.no_grad():
        plain = reference.generate(ids, **settings)
    for gamma in (0.0, 1.0):
        fp.patch(model, guidance=dict(gamma=gamma))
        assert patch_options(model).guidance.layers == (1, 2, 3, 4)
        got = outputs(model, ids, mask, **images)
        with torch.no_grad():
            tokens = model.generate(ids, **settings)
        if gamma == 0.0:
            assert_real_close(got, want, mask, **GEMMA4_TOLERANCE)
            assert_same_greedy(tokens, plain, **GEMMA4_TOLERANCE)
        else:
            assert_real_close(got[:, :-1], want[:, :-1], mask[:, :-1], **GEMMA4_TOLERANCE)
            assert (got[:, -1] - want[:, -1]).abs().max() > 1e-2


def test_four_d_masks_of_unlisted_modules():
    """In a module patch did not list (a vision tower), a 4D mask that only expands a key padding
    mask (Idefics3's tower in 4.57) becomes that padding, bidirectional; one that depends on the
    query (causal, here) is still refused."""
    tower = torch.nn.Linear(1, 1)
    padding = torch.tensor([[True] * 7 + [False] * 2, [True] * 9])
    additive = torch.zeros(2, 1, 9, 9).masked_fill(~padding[:, None, None, :], torch.finfo(torch.float32).min)
    got, causal, *_ = _attention._pattern_of(tower, additive, None, None, 9)
    assert torch.equal(got, padding) and causal is False
    causal_4d = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9)
    with pytest.raises(NotImplementedError, match="4D mask"):
        _attention._pattern_of(tower, causal_4d, None, None, 9)


def test_vision_language_model_and_its_sub_configs():
    """A LLaVA (CLIP vision tower + Llama text model, each with its own sub-config): every config
    switches and is restored; the image-token forward equals the unpatched one."""
    config = small_llava_config()
    reference = transformers.LlavaForConditionalGeneration(config).eval()
    model = transformers.LlavaForConditionalGeneration(copy.deepcopy(config)).eval()  # patch switches its configs
    model.load_state_dict(reference.state_dict())
    before = {id(c): c._attn_implementation for c in _lookups._configs(model)}
    # LLaVA, CLIP vision, Llama text (in 4.53 the sub-models hold copies of the sub-configs: 5 configs)
    assert sorted({type(c).__name__ for c in _lookups._configs(model)}) == ["CLIPVisionConfig", "LlamaConfig",
                                                                              "LlavaConfig"]
    fp.patch(model)
    assert all(c._attn_implementation == "fastprobe" for c in _lookups._configs(model))
    assert not any(c._attn_implementation == "fastprobe" for c in _lookups._configs(reference))
    assert len(attention_layers(model)) == 2  # the text model's self-attention; the vision tower runs plain
    ids, mask = torch.randint(3, 290, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    ids[:, 4:8] = 299  # 2 x 2 patches per image
    pixels = torch.randn(2, 3, 28, 28)
    with fp.record_attention(model) as record:
        got = outputs(model, ids, mask, pixel_values=pixels)
    assert_real_close(got, outputs(reference, ids, mask, pixel_values=pixels), mask)
    assert record.sink_mass.shape == (2, 4)
    fp.unpatch(model)
    assert {id(c): c._attn_implementation for c in _lookups._configs(model)} == before


# ---------------------------------------------------------------- unpatch, two models


@pytest.mark.parametrize("arch", ["llama", "gemma2", "bert"])  # sdpa, eager (Gemma 2's default), encoder
def test_unpatch_restores_exactly(arch):
    model = tiny_model(arch)
    before = {id(c): c._attn_implementation for c in _lookups._configs(model)}
    ids, mask = inputs()
    want = outputs(model, ids, mask)
    patch_or_skip(model, window=3, head_mask={0: [True, False, True, True]})
    outputs(model, ids, mask)
    assert fp.unpatch(model) is model
    assert not is_patched(model)
    assert {id(c): c._attn_implementation for c in _lookups._configs(model)} == before
    assert not any(hasattr(m, "_fastprobe_state") for m in model.modules())
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert torch.equal(outputs(model, ids, mask), want)
    assert fp.unpatch(model) is model  # not patched: a no-op


def test_two_models_patched_differently():
    """Options live on the instance: a pruned head in one model leaves the other untouched."""
    reference = tiny_model("llama")
    plain = fp.patch(tiny_model("llama"))
    pruned = fp.patch(tiny_model("llama"), head_mask={1: [True, False, True, True]})
    ids, mask = inputs()
    want = outputs(reference, ids, mask)
    assert_real_close(outputs(plain, ids, mask), want, mask)
    got = outputs(pruned, ids, mask)
    assert (got - want)[mask.bool()].abs().max() > 1e-3
    # the pruned head removed by hand in the reference: zero its input columns of o_proj
    with torch.no_grad():
        reference.model.layers[1].self_attn.o_proj.weight[:, 16:32] = 0
    assert_real_close(got, outputs(reference, ids, mask), mask)
    assert patch_options(plain).head_mask == {}


def test_a_deep_copy_of_a_patched_model_is_patched_on_its_own():
    """copy.deepcopy of a patched model (a frozen reference, an EMA copy) runs patched with the
    same options, records its own statistics, and unpatching it leaves the original patched."""
    model = fp.patch(tiny_model("llama"), head_mask={1: [True, False, True, True]})
    ids, mask = inputs()
    want = outputs(model, ids, mask)
    twin = copy.deepcopy(model)
    assert is_patched(twin) and patch_options(twin).head_mask[1].tolist() == [True, False, True, True]
    assert torch.equal(outputs(twin, ids, mask), want)
    with fp.record_attention(twin) as record:
        outputs(twin, ids, mask)
    assert torch.isfinite(record.sink_mass).all()
    fp.unpatch(twin)
    assert not is_patched(twin) and not twin._forward_hooks and not twin._forward_pre_hooks
    assert twin.config._attn_implementation == "sdpa" and model.config._attn_implementation == "fastprobe"
    assert is_patched(model) and model._forward_hooks and torch.equal(outputs(model, ids, mask), want)


def test_a_deep_copy_of_part_of_a_patched_model_is_not_patched():
    """copy.deepcopy of a part of a patched model (its backbone model.model, a decoder layer) has
    no patched model around it to own a patch: it runs as the unpatched part did, and can be
    patched, recorded and unpatched on its own. (It ran the original's options, its pruned head
    included, while is_patched said False and unpatch left it on "fastprobe"; patch and
    record_attention refused it as part of a LlamaForCausalLM that does not contain it.)"""
    reference = tiny_model("llama")
    model = fp.patch(copy.deepcopy(reference), head_mask={0: [False, True, True, True]})
    ids, mask = inputs()
    pruned = outputs(model, ids, mask)
    backbone, layer = copy.deepcopy(model.model), copy.deepcopy(model.model.layers[1])
    assert not is_patched(backbone) and backbone.config._attn_implementation == "sdpa"
    assert layer.self_attn.config._attn_implementation == "sdpa"
    with torch.no_grad():
        want = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_real_close(backbone(input_ids=ids, attention_mask=mask).last_hidden_state, want, mask)
    with fp.record_attention(backbone) as record:
        with torch.no_grad():
            backbone(input_ids=ids, attention_mask=mask)
    assert record.num_queries.tolist() == [mask.sum().item()] * 2 and not is_patched(backbone)
    fp.unpatch(fp.patch(backbone, num_sink=1))
    assert backbone.config._attn_implementation == "sdpa"
    assert is_patched(model) and model.config._attn_implementation == "fastprobe"
    assert torch.equal(outputs(model, ids, mask), pruned)
    # a model deep-copied after one of its layers (one deepcopy) gets that layer's state, on its configs' sdpa
    _, twin = copy.deepcopy([model.model.layers[1], model])
    with pytest.raises(RuntimeError, match="switched to 'sdpa' since"):
        outputs(twin, ids, mask)
    assert torch.equal(outputs(fp.patch(twin, head_mask={0: [False, True, True, True]}), ids, mask), pruned)


def test_a_copy_made_while_recording_is_not_recording():
    """A deep copy taken inside record_attention (a snapshot mid-analysis) records nothing of the
    original's block: the copy can open its own record and be unpatched after the block."""
    model = fp.patch(tiny_model("llama"))
    ids, mask = inputs()
    with fp.record_attention(model) as record:
        outputs(model, ids, mask)
        twin = copy.deepcopy(model)
        outputs(twin, ids, mask)  # (not counted in the original's record)
    with fp.record_attention(twin) as copied:
        outputs(twin, ids, mask)
    assert torch.equal(copied.num_queries, record.num_queries)  # (one forward each)
    assert torch.allclose(copied.sink_mass, record.sink_mass)
    fp.unpatch(twin)
    assert not is_patched(twin) and is_patched(model)


def test_a_pickled_patched_model_runs_where_fastprobe_was_never_registered(monkeypatch):
    """pickle (torch.save) of a patched model, loaded in a fresh process: there transformers has no
    "fastprobe" attention until something registers it, and the copy's config names it; unpickling
    the patch registers it again (the forward raised KeyError)."""
    import pickle

    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    model = fp.patch(tiny_model("llama"), head_mask={1: [True, False, True, True]})
    ids, mask = inputs()
    want = outputs(model, ids, mask)
    saved = pickle.dumps(model)
    for interface in (AttentionInterface, AttentionMaskInterface):  # as in a fresh process
        monkeypatch.delitem(interface._global_mapping, integration.KEY)
    loaded = pickle.loads(saved)
    assert is_patched(loaded) and torch.equal(outputs(loaded, ids, mask), want)


def cpu_replicas(model, count: int, monkeypatch) -> list:
    """torch.nn.DataParallel's replicas of a model (torch.nn.parallel.replicate), made on the CPU:
    the broadcast of the parameters to the devices becomes plain copies."""
    import importlib

    replicate = importlib.import_module("torch.nn.parallel.replicate")
    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape",
                        lambda tensors, devices, detach: [[t.detach().clone() for t in tensors] for _ in devices])
    return replicate.replicate(model, list(range(count)))


def test_data_parallel_replicas_of_a_patched_model(monkeypatch):
    """torch.nn.DataParallel runs a replica of the model per device, each in its own thread on its
    slice of the batch. A replica's modules are copies that keep the originals' attributes, so they
    share the model's patch: they run with its options and add to its record (they ran plain
    attention, and the forward's safety net raised). A replica's vision tower does not warn that it
    shares a patched model's config (it did)."""
    from concurrent.futures import ThreadPoolExecutor

    model = fp.patch(tiny_model("llama"), head_mask={1: [True, False, True, True]})
    ids, mask = inputs(batch=4)
    want = outputs(model, ids, mask)
    with fp.record_attention(model) as whole:
        outputs(model, ids, mask)
    replicas = cpu_replicas(model, 2, monkeypatch)
    with fp.record_attention(model) as record, ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda i: outputs(replicas[i], ids[2 * i:2 * i + 2], mask[2 * i:2 * i + 2]), (0, 1)))
    assert_real_close(torch.cat(got), want, mask)
    torch.testing.assert_close(record.sink_mass, whole.sink_mass, **TOLERANCE)
    assert record.num_queries.tolist() == whole.num_queries.tolist()

    vlm = fp.patch(transformers.LlavaForConditionalGeneration(small_llava_config()).eval())
    ids = torch.randint(3, 290, (1, 10))
    ids[:, 4:8] = 299
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs(cpu_replicas(vlm, 1, monkeypatch)[0], ids, torch.ones_like(ids), pixel_values=torch.randn(1, 3, 28, 28))


@pytest.mark.gpu
def test_a_record_pools_layers_on_other_devices():
    """A model split over devices (device_map) or DataParallel's replicas run layers on other
    devices than the record's tables: their statistics are added there (the in-place sum raised)."""
    record = integration.AttentionRecord(2, 4, ("sink_mass", "entropy"), device=torch.device("cpu"))
    sink_mass, entropy = torch.rand(2, 2, 4, 3), torch.rand(2, 2, 4, 3)
    padding = torch.tensor([[False, True, True], [True, True, True]])
    for layer, device in enumerate(("cpu", "cuda")):
        result = fp.AttentionOutput(None, None, sink_mass[layer].to(device), None, entropy[layer].to(device))
        record.add(layer, result, padding.to(device), None)
    weight = padding.float().view(2, 1, 3)
    torch.testing.assert_close(record.sink_mass, (sink_mass * weight).sum((1, 3)) / 5)
    torch.testing.assert_close(record.entropy, (entropy * weight).sum((1, 3)) / 5)
    assert record.num_queries.tolist() == [5, 5]


def test_patch_again_replaces_options():
    model = fp.patch(tiny_model("llama"), window=3, num_sink=1)
    fp.patch(model, head_mask=torch.ones(2, 4, dtype=torch.bool))
    options = patch_options(model)
    assert options.window is None and options.num_sink == 0 and set(options.head_mask) == {0, 1}
    assert model.config._attn_implementation == "fastprobe"
    fp.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


def test_an_implementation_switched_after_patch_is_named_and_patch_switches_back():
    """set_attn_implementation("sdpa") on a patched model: its forward says the implementation
    was switched (it said the attention does not go through the AttentionInterface), patch()
    switches it back with the same logits (it only replaced the options, leaving sdpa), and
    unpatch restores what the model had before the first patch."""
    model = fp.patch(tiny_model("llama"), window=3)
    if not hasattr(model, "set_attn_implementation"):
        pytest.skip("transformers 4.53 has no set_attn_implementation")
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.set_attn_implementation("sdpa")
        with pytest.raises(RuntimeError, match="attention implementation was switched to 'sdpa' since"):
            model(input_ids=ids)
        fp.patch(model, window=3)
        assert model.config._attn_implementation == "fastprobe"
        assert torch.equal(model(input_ids=ids).logits, before)
    fp.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- options vs transformers' own masks


def visibility_mask(mask, window, num_sink):
    """[B, 1, L, L] bool: causal, p - window < j <= p, the first num_sink real keys always, no
    padding keys; a 4D mask transformers passes to sdpa untouched."""
    length = mask.shape[1]
    position = torch.arange(length)
    causal = position[None, :] <= position[:, None]
    in_window = position[None, :] > position[:, None] - window
    real = mask.bool()
    sink = real & (real.long().cumsum(-1) <= num_sink)
    visible = causal[None] & (in_window[None] | sink[:, None, :]) & real[:, None, :]
    # A left-padded query sees no key: give it every key (its output is unspecified anyway). torch
    # 2.4's sdpa returns NaN for a fully masked row (2.13's returns 0), and the NaN would reach the
    # real rows through the next layer's values (0 * NaN).
    visible = visible | ~visible.any(-1, keepdim=True)
    return visible[:, None]


@pytest.mark.parametrize("num_sink", [0, 2])
def test_window_and_sinks_match_a_4d_mask(num_sink):
    """patch(window, num_sink) equals the unpatched model given the equivalent 4D mask."""
    reference, model = tiny_model("llama"), fp.patch(tiny_model("llama"), window=3, num_sink=num_sink)
    ids, mask = inputs(padding="left")
    want = outputs(reference, ids, visibility_mask(mask, 3, num_sink))
    assert_real_close(outputs(model, ids, mask), want, mask)


def test_layers_of_one_forward_share_the_prepared_key_masks(monkeypatch):
    """The padding mask is put in the kernels' form once per forward and mask kind, not once per
    layer: Gemma 2 alternates full and sliding-window layers (two masks), Llama has one."""
    made = []

    def counting(*args, **kwargs):
        made.append(kwargs)
        return fp.ops.attention.key_masks(*args, **kwargs)

    monkeypatch.setattr(_attention, "key_masks", counting)
    for arch, kinds in (("llama", 1), ("gemma2", 2)):
        model = patch_or_skip(tiny_model(arch, num_layers=4), num_sink=1)
        assert len(attention_layers(model)) == 4
        made.clear()
        outputs(model, *inputs())
        assert len(made) == kinds, arch


def test_window_option_equals_mistral_sliding_window():
    """A Llama patched with window=4 is a Mistral with sliding_window=4 (same weights)."""
    llama = tiny_model("llama")
    mistral = transformers.MistralForCausalLM(tiny_config("mistral", head_dim=16, sliding_window=4)).eval()
    mistral.load_state_dict(llama.state_dict())
    fp.patch(llama, window=4)
    ids, mask = inputs()
    assert_real_close(outputs(llama, ids, mask), outputs(mistral, ids, mask), mask)


@pytest.mark.parametrize("window", [8, 2])
def test_a_layers_own_narrower_window_is_kept(window):
    """A Mistral (sliding_window=4) patched with window=8 keeps its own narrower 4; with window=2
    the option is the narrower one and equals a Mistral of sliding_window=2."""
    model = fp.patch(tiny_model("mistral"), window=window)
    config = tiny_config("mistral", head_dim=16, sliding_window=min(window, 4))
    reference = transformers.MistralForCausalLM(config).eval()
    reference.load_state_dict(model.state_dict())
    ids, mask = inputs(length=13)
    assert_real_close(outputs(model, ids, mask), outputs(reference, ids, mask), mask)


def test_head_mask_forms_are_equivalent():
    keep = torch.tensor([[True, True, True, True], [False, True, True, False]])
    model = fp.patch(tiny_model("llama"), head_mask=keep)
    ids, mask = inputs()
    as_tensor = outputs(model, ids, mask)
    fp.patch(model, head_mask={1: [0, 1, 1, 0]})  # lists of 0/1 work too; layer 0 keeps every head
    assert torch.equal(outputs(model, ids, mask), as_tensor)


@pytest.mark.parametrize("bad, error, match", [
    (dict(head_mask={5: [True] * 4}), ValueError, "names layer 5"),
    (dict(head_mask={0: [True] * 3}), ValueError, r"shape \[heads\] = \[4\]"),
    (dict(head_mask={0: [0.5] * 4}), TypeError, "boolean"),
    (dict(head_mask={0: torch.ones(4)}), TypeError, r"boolean \(or integer 0/1\) tensor .* got torch.float32"),
    (dict(head_mask={0: [2, 1, 1, 1]}), ValueError, "only 0/1"),
    # (values torch cannot read as a tensor: torch's own errors, naming no option)
    (dict(head_mask={0: None}), TypeError, r"head_mask\[0\] must be a 1-D boolean .* got NoneType"),
    (dict(head_mask={1: "1011"}), TypeError, r"head_mask\[1\] must be a 1-D boolean .* got str"),
    (dict(head_mask={0: torch.ones(4, dtype=torch.bool, device="meta")}), TypeError, r"head_mask\[0\]"),
    (dict(head_mask=torch.ones(3, 4)), ValueError, r"\[layers, heads\]"),
    (dict(head_mask=[[True] * 4] * 2), TypeError, r"head_mask must be a mapping layer -> bool \[heads\] .* got list"),
    (dict(guidance=1.0), TypeError, r"guidance must be a dict \(gamma, .*\) or GuidanceOptions, got float"),
    (dict(window=0), ValueError, "window must be >= 1"),
    (dict(num_sink=-1), ValueError, "num_sink"),
    (dict(num_sink=1.5), TypeError, "num_sink"),
    (dict(record=("sink_mass", "weights")), ValueError, "statistics"),
    (dict(record=None), TypeError, "record must be a statistic's name .* got NoneType"),
])
def test_bad_options_raise_and_leave_the_model_alone(bad, error, match):
    model = tiny_model("llama")
    with pytest.raises(error, match=match):
        fp.patch(model, **bad)
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"


def test_a_head_mask_naming_the_layer_past_the_last_is_refused():
    """Layers are 0 .. count - 1: the count itself names no layer (it passed the check, then failed
    with an IndexError further in)."""
    model = tiny_model("llama")
    count = model.config.num_hidden_layers
    with pytest.raises(ValueError, match=f"names layer {count}, but the model has {count} self-attention layers"):
        fp.patch(model, head_mask={count: [True] * 4})
    assert not is_patched(model)


# ---------------------------------------------------------------- mask semantics (the off-by-one)


def takes(function, name: str) -> bool:
    return name in inspect.signature(function).parameters


def materialised(mask_function, length):
    """The [L, L] mask transformers' sdpa_mask builds (4.5x's takes cache_position, 5.x's q_length)."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    queries = dict(q_length=length) if takes(masking_utils.sdpa_mask, "q_length") else dict(
        cache_position=torch.arange(length))
    return masking_utils.sdpa_mask(batch_size=1, kv_length=length, mask_function=mask_function,
                                   allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **queries)[0, 0]


@pytest.mark.parametrize("window", [1, 3, 5])
def test_mask_pattern_windows_match_transformers_masks(window):
    """The (causal, window) read from transformers' mask functions gives exactly the mask sdpa
    builds from them: causal sliding_window w -> window w, bidirectional w -> window w + 1."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    cases = {
        masking_utils.causal_mask_function: (True, None),
        masking_utils.sliding_window_causal_mask_function(window): (True, window),
    }
    if hasattr(masking_utils, "bidirectional_mask_function"):  # from 5.0 (4.5x's encoders build their own masks)
        cases[masking_utils.bidirectional_mask_function] = (False, None)
    if hasattr(masking_utils, "sliding_window_bidirectional_mask_function"):  # (not in 5.0: T5Gemma had its own)
        cases[masking_utils.sliding_window_bidirectional_mask_function(window)] = (False, window + 1)
    length = 11
    for function, expected in cases.items():
        causal, ours = _masks._mask_pattern(function)
        assert (causal, ours) == expected
        real = torch.ones(1, length, dtype=torch.bool)
        visible = fp.reference.attention_visible(real, torch.zeros_like(real), length, causal, ours)[0]
        assert torch.equal(visible, materialised(function, length))


def test_blockwise_masks_match_transformers_masks():
    """5.x's blockwise overlay (Gemma 3's image tokens, PaliGemma's prefix) becomes the kernels'
    bidirectional blocks, which give exactly the mask sdpa builds: with full attention, with a
    window and-ed over it (Gemma 3's sliding layers, blocks longer than the window included), and
    with a window or-ed beside it while no block is longer than the window; a longer one there
    is refused when a layer attends with it."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    if not hasattr(masking_utils, "blockwise_overlay"):
        pytest.skip(f"transformers {transformers.__version__} has no blockwise overlay")
    causal, overlay, and_masks, or_masks = (masking_utils.causal_mask_function, masking_utils.blockwise_overlay,
                                            masking_utils.and_masks, masking_utils.or_masks)
    window = masking_utils.sliding_window_overlay
    length = 13
    images = torch.tensor([[-1, 0, 0, 0, -1, -1, 1, 1, 1, 1, 1, -1, -1]])  # blocks of 3 and 5 positions
    prefix = torch.tensor([[0] * 8 + [-1] * 5])
    cases = [
        or_masks(causal, overlay(images)),
        or_masks(causal, overlay(prefix)),
        and_masks(or_masks(causal, overlay(images)), window(3)),
        or_masks(and_masks(causal, window(5)), overlay(images)),
    ]
    real = torch.ones(1, length, dtype=torch.bool)
    for function in cases:
        mask = _masks.key_padding_mask(1, length, length, mask_function=function, cache_position=torch.arange(length),
                                            attention_mask=real.long())
        _, causal_order, ours, _, _, blocks, _, _ = _attention._pattern_of(None, mask, None, None, length)
        assert blocks is not None
        pairs = fp.reference.block_pairs(blocks.horizon, length)  # (a horizon is itself block ids)
        visible = fp.reference.attention_visible(real, torch.zeros_like(real), length, causal_order, ours, pairs)[0]
        assert torch.equal(visible, materialised(function, length))
    too_long = or_masks(and_masks(causal, window(4)), overlay(images))
    mask = _masks.key_padding_mask(1, length, length, mask_function=too_long, cache_position=torch.arange(length),
                                        attention_mask=real.long())
    with pytest.raises(NotImplementedError, match="no longer than the window"):
        _attention._pattern_of(None, mask, None, None, length)


def test_chunked_and_packed_masks_match_transformers_masks():
    """Chunked attention (counted from each row's first real token where the installed
    transformers does so) and packed sequences (5.x remaps positions to each sequence's own)
    become the kernels' segments, which give exactly the mask sdpa builds, prefill and decoding
    from a sliding cache (keys = the last positions)."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    chunking, and_masks = masking_utils.chunked_causal_mask_function, masking_utils.and_masks
    causal, window = masking_utils.causal_mask_function, masking_utils.sliding_window_overlay
    padding = torch.tensor([[0, 0, 0] + [1] * 10, [1] * 13])  # row 0: three left-padding tokens
    length, left = 13, (padding == 0).long().cumprod(-1).sum(-1)
    chunked = chunking(4, left) if takes(chunking, "left_padding") else chunking(4)  # 4.53: from position 0
    packed_ids = torch.tensor([[0] * 5 + [1] * 6 + [2] * 2] * 2)
    packing = masking_utils.packed_sequence_mask_function(packed_ids)
    positions = torch.cat([torch.arange(5), torch.arange(6), torch.arange(2)]).expand(2, -1)
    remap = getattr(masking_utils, "remap_positions_for_packed_sequence", lambda function, _: function)  # 5.x
    cases = [
        (chunked, padding),
        (and_masks(remap(causal, positions), packing), None),
        (and_masks(remap(and_masks(causal, window(3)), positions), packing), None),
    ]
    for function, attention_mask in cases:
        for kv_offset in (0, 5):  # prefill; 3 queries over the last 8 keys
            kv_length = length - kv_offset
            q_length = length if kv_offset == 0 else 3
            if attention_mask is None and kv_offset:
                continue  # transformers packs only without a cache
            given = attention_mask if attention_mask is not None else torch.ones(2, length, dtype=torch.long)
            mask = _masks.key_padding_mask(
                2, q_length, kv_length, q_offset=length - q_length, kv_offset=kv_offset, mask_function=function,
                attention_mask=given, cache_position=torch.arange(length - q_length, length))
            real, causal_order, ours, _, _, blocks, segments, first_key = _attention._pattern_of(
                None, mask, None, None, kv_length)
            assert first_key == kv_offset  # (the recorder's key groups are taken from there)
            assert segments is not None and blocks is None
            visible = fp.reference.attention_visible(
                real, torch.zeros_like(real), q_length, causal_order, ours,
                same_segment=fp.reference.segment_pairs(segments.start, q_length))  # (a start is itself segment ids)
            for row in range(2):
                want = torch.tensor([[bool(function(*map(torch.tensor, (row, 0, q, kv)))) and bool(given[row, kv])
                                      for kv in range(kv_offset, length)]
                                     for q in range(length - q_length, length)])
                assert torch.equal(visible[row], want), (function, kv_offset, row)


def test_mask_functions_without_a_module_name_are_read_by_their_file():
    """torch before 2.11's Dynamo reads the __module__ of a closure made inside the compiled forward
    as absent (torch 2.6 and 2.10: a patched Gemma 2's sliding mask was refused under
    torch.compile): the mask functions are then told by their code's file, at every level."""
    import types

    masking_utils = pytest.importorskip("transformers.masking_utils")

    def anonymous(fn):
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__module__ = None
        return copy

    causal, window, and_masks = (masking_utils.causal_mask_function, masking_utils.sliding_window_overlay,
                                 masking_utils.and_masks)
    packing = masking_utils.packed_sequence_mask_function(torch.zeros(2, 8, dtype=torch.long))
    assert _masks._mask_pattern(anonymous(and_masks(causal, window(3)))) == (True, 3)
    assert _masks._mask_pattern(and_masks(anonymous(causal), anonymous(packing))) == (True, None)
    assert _masks._module_of(anonymous(window(3))) == masking_utils.__name__
    assert _masks._module_of(anonymous(_masks._mask_pattern)) is None  # (not transformers' code)
    with pytest.raises(NotImplementedError, match="cannot reproduce"):
        _masks._mask_pattern(and_masks(causal, anonymous(lambda b, h, q, kv: kv % 2 == 0)))


def test_mask_patterns_it_cannot_reproduce_are_refused():
    masking_utils = pytest.importorskip("transformers.masking_utils")
    custom = masking_utils.and_masks(masking_utils.causal_mask_function, lambda b, h, q, kv: kv % 2 == 0)
    with pytest.raises(NotImplementedError, match="cannot reproduce"):
        _masks._mask_pattern(custom)


def test_masks_it_cannot_reproduce_are_refused_when_a_layer_attends_with_them():
    """Models build masks for layer types they may not have (Qwen2-MoE always makes a sliding one,
    of window 0 when unused): the mask function hands such a mask back, and only attention with it
    is refused."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    unusable = masking_utils.and_masks(masking_utils.causal_mask_function, lambda b, h, q, kv: kv % 2 == 0)
    mask = _masks.key_padding_mask(2, 5, 5, mask_function=unusable, cache_position=torch.arange(5),
                                        attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert mask.shape == (2, 5)
    with pytest.raises(NotImplementedError, match="cannot reproduce"):
        _attention._pattern_of(None, mask, None, None, 5)
    if not hasattr(transformers, "Qwen2MoeConfig"):
        return
    config = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, pad_token_id=0)
    models = []
    for _ in range(2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            models.append(transformers.AutoModelForCausalLM.from_config(transformers.Qwen2MoeConfig(**config)).eval())
    reference, model = models[0], patch_or_skip(models[1])
    ids, mask = inputs()
    assert_real_close(outputs(model, ids, mask), outputs(reference, ids, mask), mask)


def unless_masks_need_newer_torch(call, what="image-block masks"):
    """call(), or a skip where transformers itself builds or/and mask functions only with torch>=2.6."""
    try:
        return call()
    except ValueError as error:  # transformers' own requirement for such masks, not fastprobe's
        if "torch>=2.6" not in str(error):
            raise
        pytest.skip(f"transformers {transformers.__version__} builds {what} only with torch>=2.6")


def test_bidirectional_gemma3_text_model():
    """Gemma 3 with use_bidirectional_attention (EmbeddingGemma) makes its own or-parts: |q - j| <
    sliding_window on the sliding layers, `lambda *args: torch.tensor(True)` on the full ones (refused
    before as masks fastprobe cannot reproduce). Patched equals eager, padded rows included, and
    the recorded entropy equals eager weights'."""
    config_class = getattr(transformers, "Gemma3TextConfig", None)
    if config_class is None or "use_bidirectional_attention" not in inspect.signature(config_class).parameters:
        pytest.skip(f"transformers {transformers.__version__} has no bidirectional Gemma 3")
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8, pad_token_id=0,
                    use_bidirectional_attention=True, layer_types=["sliding_attention", "full_attention"])
    models = []
    for implementation in ("eager", "sdpa"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            config = config_class(**settings, attn_implementation=implementation)
            models.append(transformers.Gemma3TextModel(config).eval())
    reference, model = models[0], patch_or_skip(models[1])
    ids, mask = inputs(batch=3, length=13)
    want = unless_masks_need_newer_torch(lambda: outputs(reference, ids, mask))  # (its or-parts)
    assert_real_close(outputs(model, ids, mask), want, mask)
    with torch.no_grad():
        weights = reference(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    with fp.record_attention(model, statistics=("entropy",)) as record:
        outputs(model, ids, mask)
    real = mask.bool()
    for layer, layer_weights in enumerate(weights):  # each real query's entropy, averaged over the real queries
        entropy = -(layer_weights * layer_weights.clamp_min(1e-30).log()).sum(-1)  # [B, H, L]
        mean = (entropy * real[:, None]).sum((0, 2)) / real.sum()
        torch.testing.assert_close(record.entropy[layer], mean.to(record.entropy.dtype), rtol=1e-4, atol=1e-4)


def test_gemma3_vision_language_model_on_text_and_on_images():
    """Gemma 3's processor sends token_type_ids with every prompt, and its mask lets each image's
    tokens attend to each other both ways: a batch without images is plain causal attention (the
    image-block part unmasks nothing) and runs patched. With images, 5.x's blockwise overlay and the
    image groups of later 4.5x releases run patched as bidirectional blocks (same logits and tokens,
    the sliding layers' window of 4 as long as the images); 4.53's token-type rule (|q - kv| <=
    tokens per image, which also joins two nearby images) is refused clearly."""
    if not hasattr(transformers, "Gemma3ForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 3")
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=4, pad_token_id=0,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=7)
    models = []
    for _ in range(2):  # each with its own config: patch switches the configs it finds
        config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                           image_token_index=299, boi_token_index=297, eoi_token_index=298)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            models.append(transformers.Gemma3ForConditionalGeneration(config).eval())
    reference, model = models[0], patch_or_skip(models[1])
    assert reference.config.get_text_config()._attn_implementation != "fastprobe"
    ids, mask = inputs(batch=2, length=14)
    ids = ids % 290
    no_images = torch.zeros_like(ids)  # the reference runs without them (4.53's own sdpa mask breaks on them)
    unless_masks_need_newer_torch(lambda: outputs(model, ids, mask, token_type_ids=no_images))
    assert_real_close(outputs(model, ids, mask, token_type_ids=no_images), outputs(reference, ids, mask), mask)
    with torch.no_grad():
        settings = dict(attention_mask=inputs(batch=2, length=14, padding="left")[1], max_new_tokens=6,
                        do_sample=False, pad_token_id=0)
        got = model.generate(ids, token_type_ids=no_images, **settings)
        assert torch.equal(got, reference.generate(ids, **settings))
    ids[:, 6], ids[:, 7:11], ids[:, 11] = 297, 299, 298  # <start_of_image>, 4 image tokens, <end_of_image>
    images = dict(token_type_ids=(ids == 299).long(), pixel_values=torch.randn(2, 3, 28, 28))
    groups_images = bool({"image_group_ids", "group_ids"} & set(inspect.signature(  # (4.57; 5.x before the overlay)
        transformers.models.gemma3.modeling_gemma3.token_type_ids_mask_function).parameters)) if not hasattr(
        transformers.masking_utils, "blockwise_overlay") else True
    if not groups_images:
        with pytest.raises(NotImplementedError, match="image-token blocks"):
            outputs(model, ids, torch.ones_like(ids), **images)
        return
    mask = inputs(batch=2, length=14, padding="left")[1]
    assert_real_close(outputs(model, ids, mask, **images), outputs(reference, ids, mask, **images), mask)
    with torch.no_grad():
        got = model.generate(ids, **images, **settings)
        assert torch.equal(got, reference.generate(ids, **images, **settings))
    # contrastive guidance on the sliding and the full-attention layer keeps the window and the
    # blocks: gamma 0 is plain attention
    fp.patch(model, guidance=dict(gamma=0.0, layers=[0, 1], image_token_id=299))
    assert_real_close(outputs(model, ids, mask, **images), outputs(reference, ids, mask, **images), mask)


def test_paligemma_prefix_attends_both_ways():
    """PaliGemma's prefix (image and prompt, token_type_ids 0) attends to itself both ways, the
    suffix causally. Its outer model builds that mask and hands it to the Gemma text model, which
    builds one again: fastprobe keeps the outer one (as transformers keeps a 4D mask), so the
    prefix stays bidirectional (the same logits and tokens as unpatched, padded or not)."""
    text = dict(model_type="gemma", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=7, projection_dim=64)
    models = []
    for _ in range(2):
        config = transformers.PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=299,
                                              projection_dim=64)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            models.append(transformers.PaliGemmaForConditionalGeneration(config).eval())
    if not hasattr(transformers.masking_utils, "blockwise_overlay"):
        if not routes_through_interfaces(models[1]):  # 4.53: _update_causal_mask; patch must refuse it
            patch_or_skip(models[1])
        pytest.skip(f"transformers {transformers.__version__} builds PaliGemma's prefix mask with its own function")
    reference, model = models[0], patch_or_skip(models[1])
    ids = torch.randint(3, 290, (2, 24))
    ids[:, 1:17] = 299  # 16 image tokens after <bos>
    suffix = torch.zeros_like(ids)
    suffix[:, 20:] = 1  # the last 4 tokens are the suffix
    images = dict(token_type_ids=suffix, pixel_values=torch.randn(2, 3, 28, 28))
    for mask in (torch.ones_like(ids), inputs(batch=2, length=24, padding="left")[1]):
        assert_real_close(outputs(model, ids, mask, **images), outputs(reference, ids, mask, **images), mask)
    prompt = dict(token_type_ids=suffix[:, :20], pixel_values=images["pixel_values"])
    settings = dict(attention_mask=torch.ones(2, 20, dtype=torch.long), max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids[:, :20], **prompt, **settings),
                           reference.generate(ids[:, :20], **prompt, **settings))


def test_packing_one_sequence_per_row_is_plain_causal():
    """transformers 4.53-4.57 add a packed-sequence part to every mask made without an attention
    mask and a cache: one sequence per row packs nothing (plain causal attention, no segments,
    the same outputs)."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    causal, packing = masking_utils.causal_mask_function, masking_utils.packed_sequence_mask_function
    one_each = masking_utils.and_masks(causal, packing(torch.zeros(2, 8, dtype=torch.long)))
    assert _masks._mask_pattern(one_each) == (True, None)
    mask = _masks.key_padding_mask(2, 8, 8, mask_function=one_each, cache_position=torch.arange(8))
    assert mask._fastprobe_pattern.segments is None
    reference, model = tiny_model("llama"), fp.patch(tiny_model("llama"))
    ids, _ = inputs(padding="none")
    with torch.no_grad():
        want = reference(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, want, **TOLERANCE)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])  # causal; a sliding window; both, soft cap-free
def test_packed_sequences_match_unpatched_and_each_sequence_alone(arch):
    """Sequences packed in one row (position ids restarting at 0, no attention mask: how
    transformers detects packing) give the unpatched model's logits, which are each sequence's
    own; recorded sink mass is each sequence's weight on its own first token."""
    if TORCH_BEFORE_2_6:
        pytest.skip(PACKING_NEEDS_TORCH_2_6)
    reference, model = tiny_model(arch), fp.patch(tiny_model(arch))
    lengths = [5, 9, 3, 7]
    ids = torch.randint(3, VOCAB, (2, sum(lengths)))
    positions = torch.cat([torch.arange(length) for length in lengths]).expand(2, -1)
    with torch.no_grad():
        want = reference(input_ids=ids, position_ids=positions, use_cache=False).logits
        with fp.record_attention(model) as packed_record:
            got = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        torch.testing.assert_close(got, want, **TOLERANCE)
        begin, mass = 0, 0
        for length in lengths:
            part = slice(begin, begin + length)
            with fp.record_attention(model) as record:
                alone = model(input_ids=ids[:, part], use_cache=False).logits
            torch.testing.assert_close(got[:, part], alone, **TOLERANCE)
            mass = mass + record.sink_mass * length
            begin += length
    torch.testing.assert_close(packed_record.sink_mass, mass / sum(lengths), **TOLERANCE)


def flattened(ids, lengths):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True)'s batch of the sequences of
    `lengths` cut from ids [L]: input_ids and position_ids [1, L], int32 cu_seq_lens_q/k
    [sequences + 1], int max_length_q/k (labels dropped)."""
    cuts = torch.tensor([0, *lengths]).cumsum(0).tolist()
    features = [{"input_ids": ids[start:end].tolist()} for start, end in zip(cuts[:-1], cuts[1:])]
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    batch.pop("labels")
    return dict(batch)


def each_alone(model, ids, lengths, absolute_positions=False):
    """(logits of each sequence run alone, concatenated [1, L, V], sink_mass recorded over them
    weighted by length: the mean over all their queries). absolute_positions: each sequence at
    the positions it has in the row, else from 0."""
    logits, mass, begin = [], 0, 0
    for length in lengths:
        part = slice(begin, begin + length)
        positions = torch.arange(begin, begin + length)[None] if absolute_positions else None
        with fp.record_attention(model) as record:
            logits.append(model(input_ids=ids[None, part], position_ids=positions, use_cache=False).logits)
        mass = mass + record.sink_mass * length
        begin += length
    return torch.cat(logits, dim=1), mass / sum(lengths)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])  # causal; a sliding window; both (two masks)
def test_flash_packing_kwargs_match_each_sequence_alone(arch):
    """Patched layers take flash attention's packing kwargs (cu_seq_lens_q/k, max_length_q/k, as
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes them): each sequence attends
    within itself, with its own first token as the sink, the same as the packed call without
    them (packed position ids), as the unpatched model (which ignores them) and as each sequence
    run alone."""
    reference, model = tiny_model(arch), fp.patch(tiny_model(arch))
    lengths = [5, 9, 3, 7]
    batch = flattened(torch.randint(3, VOCAB, (sum(lengths),)), lengths)
    without = {name: batch[name] for name in ("input_ids", "position_ids")}
    with torch.no_grad():
        with fp.record_attention(model) as record:
            got = model(**batch, use_cache=False).logits
        if not TORCH_BEFORE_2_6:  # (PACKING_NEEDS_TORCH_2_6: else neither attends within the sequences)
            torch.testing.assert_close(got, model(**without, use_cache=False).logits, **TOLERANCE)
            torch.testing.assert_close(got, reference(**batch, use_cache=False).logits, **TOLERANCE)
        alone, mass = each_alone(model, batch["input_ids"][0], lengths)
    torch.testing.assert_close(got, alone, **TOLERANCE)
    torch.testing.assert_close(record.sink_mass, mass, **TOLERANCE)


def test_flash_packing_kwargs_alone_split_the_row():
    """cu_seq_lens without packed position ids (omitted: positions run on through the row; and
    a default cache) still give each sequence its own attention and sink, as flash attention
    does: each sequence's logits and sink mass are its own at its positions in the row."""
    model = fp.patch(tiny_model("llama"))
    lengths = [5, 9, 3, 7]
    batch = flattened(torch.randint(3, VOCAB, (sum(lengths),)), lengths)
    del batch["position_ids"]
    with torch.no_grad():
        with fp.record_attention(model) as record:
            got = model(**batch).logits
        alone, mass = each_alone(model, batch["input_ids"][0], lengths, absolute_positions=True)
        whole_row = model(input_ids=batch["input_ids"]).logits  # one sequence: attends across the cuts
    torch.testing.assert_close(got, alone, **TOLERANCE)
    torch.testing.assert_close(record.sink_mass, mass, **TOLERANCE)
    assert not torch.allclose(whole_row[:, 5:], alone[:, 5:], **TOLERANCE)


def test_flash_packing_kwargs_are_read_once_per_forward(monkeypatch):
    """The cu_seq_lens are read (a host sync) by the first layer of a forward and the mask is
    checked against them once per mask kind, not per layer: Gemma 3 alternates full and sliding
    layers (two masks); a new forward reads them afresh."""
    read, checked = [], []
    reading, checking = integration._packed_ids, _attention._layer_packed_segments
    monkeypatch.setattr(integration, "_packed_ids", lambda *args: read.append(1) or reading(*args))
    monkeypatch.setattr(_attention, "_layer_packed_segments",
                        lambda *args: checked.append(args[4].get(_attention._PACKED) is None) or checking(*args))
    model = fp.patch(tiny_model("gemma3", num_layers=4), num_sink=1)
    batch = flattened(torch.randint(3, VOCAB, (16,)), [6, 10])
    with torch.no_grad():
        for forwards in (1, 2):
            model(**batch, use_cache=False)
            assert len(read) == forwards and sum(checked) == 2 * forwards and len(checked) == 4 * forwards


def test_flash_packing_kwargs_it_cannot_honour_are_refused():
    """cu_seq_lens that disagree with packed position ids, over more than one row, with query and
    key boundaries that differ, that do not cover the row, with cached keys or with padding are
    refused, naming cu_seq_lens."""
    model = fp.patch(tiny_model("llama"))
    lengths = [5, 9, 3, 7]
    batch = flattened(torch.randint(3, VOCAB, (sum(lengths),)), lengths)

    def run(**changes):
        with torch.no_grad():
            return model(**{**batch, **changes}, use_cache=False)

    other = torch.tensor([0, 6, 14, 17, 24], dtype=torch.int32)
    if not TORCH_BEFORE_2_6:  # (PACKING_NEEDS_TORCH_2_6: else no packed position ids to disagree with)
        with pytest.raises(ValueError, match="cu_seq_lens boundaries differ"):
            run(cu_seq_lens_q=other, cu_seq_lens_k=other)
    run(cu_seq_lens_q=other, cu_seq_lens_k=other, position_ids=None)  # no packed position ids: nothing to disagree
    with pytest.raises(NotImplementedError, match="cu_seq_lens.*2 rows"):
        run(input_ids=batch["input_ids"].expand(2, -1), position_ids=batch["position_ids"].expand(2, -1))
    with pytest.raises(NotImplementedError, match="cu_seq_lens.*boundaries agree"):
        run(cu_seq_lens_k=other)
    for given, says in ((other.tolist(), "list of shape ()"), (other.float(), r"torch.float32 of shape \(5,\)"),
                        (other[None], r"torch.int32 of shape \(1, 5\)")):  # (a list, floats, 2-D)
        with pytest.raises(TypeError, match=rf"takes cu_seq_lens_q as a 1-D integer tensor .*, got {says}"):
            run(cu_seq_lens_q=given, cu_seq_lens_k=other)
    with pytest.raises(NotImplementedError, match="cu_seq_lens=.*from 0 to the row's 24"):
        run(cu_seq_lens_q=batch["cu_seq_lens_q"][:-1], cu_seq_lens_k=None)
    no_padding = torch.ones(1, sum(lengths), dtype=torch.long)
    with pytest.raises(NotImplementedError, match="cu_seq_lens.*padding"):
        run(position_ids=None, attention_mask=no_padding.index_fill(1, torch.tensor([23]), 0))
    run(position_ids=None, attention_mask=no_padding)  # fine
    with pytest.raises(NotImplementedError, match="without cu_seq_lens_q"):
        run(cu_seq_lens_q=None)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x, 4.5x
    with torch.no_grad():
        cache = generated_cache(model(input_ids=batch["input_ids"][:, :5], use_cache=True))
        with pytest.raises(NotImplementedError, match="cu_seq_lens.*no cached keys"):
            model(input_ids=batch["input_ids"][:, 5:], **{cache_name: cache},
                  cu_seq_lens_q=torch.tensor([0, 19], dtype=torch.int32), max_length_q=19)


def test_mask_function_returns_a_key_padding_mask():
    """Never an [L, L] mask: [B, kv_length], the last kv_length columns of the 2D mask."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    fp.patch(tiny_model("llama"))  # registers the key
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    function = masking_utils.AttentionMaskInterface()["fastprobe"]
    got = function(batch_size=2, q_length=1, kv_length=4, q_offset=5, kv_offset=2, attention_mask=mask.bool(),
                   mask_function=masking_utils.sliding_window_causal_mask_function(4))
    assert got.shape == (2, 4) and got.dtype == torch.bool and torch.equal(got, mask[:, 2:].bool())
    pattern = got._fastprobe_pattern
    assert pattern.causal and pattern.window == 4
    assert pattern.dropped.tolist() == [False, True]  # row 0's first real token (index 2) is still cached
    none = function(batch_size=2, q_length=6, kv_length=6, attention_mask=None,
                    mask_function=masking_utils.causal_mask_function)
    assert none.shape == (2, 6) and bool(none.all())



def test_a_mask_sized_for_fewer_keys_than_the_layer_holds():
    """A causal mask made for fewer keys than a layer holds (MiniMax's decoding masks, sized from a
    linear-attention layer's empty cache: one key, at offset 0) is read from the 2D mask it was made from: the
    layer's keys are the row's last tokens. A mask over more keys, one with a window, one without
    enough 2D mask, or a static cache's, is refused."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    row = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    step = _masks.key_padding_mask(2, 1, 1, q_offset=0, attention_mask=row,
                                        mask_function=masking_utils.causal_mask_function)
    for keys in (5, 3):
        padding, causal, window, dropped, _, blocks, segments, first = _attention._pattern_of(None, step, None, None,
                                                                                              keys)
        assert torch.equal(padding, row[:, -keys:].bool()) and causal and first == 5 - keys
        assert window is None and dropped is None and blocks is None and segments is None
    unpadded = _masks.key_padding_mask(2, 1, 1, q_offset=0, attention_mask=None, device="cpu",
                                            mask_function=masking_utils.causal_mask_function)
    assert _attention._pattern_of(None, unpadded, None, None, 5)[:3] == (None, True, None)
    with pytest.raises(ValueError, match="covers 1 keys but there are 6"):
        _attention._pattern_of(None, step, None, None, 6)
    windowed = _masks.key_padding_mask(2, 1, 1, q_offset=0, attention_mask=row,
                                            mask_function=masking_utils.sliding_window_causal_mask_function(3))
    wide = _masks.key_padding_mask(2, 1, 5, q_offset=0, attention_mask=row,
                                        mask_function=masking_utils.causal_mask_function)
    static = _masks.key_padding_mask(2, 1, 16, q_offset=torch.tensor(4), attention_mask=row,
                                          mask_function=masking_utils.causal_mask_function)
    for mask, keys in ((windowed, 5), (wide, 4), (static, 16)):
        with pytest.raises(ValueError, match="cannot move its pattern"):
            _attention._pattern_of(None, mask, None, None, keys)



def test_kv_shared_query_cut_passes_fastprobe_masks_untouched():
    """A module's _maybe_slice_kv_shared_inputs (Gemma 4's query cut before its KV-shared layers),
    as patch leaves it: fastprobe's key padding masks come back as they were (the mask mapping
    positional or by keyword), other masks are cut as before, and a mapping without fastprobe's
    masks goes through untouched; doing it twice passes through once, and the class (another
    module of it) is left alone."""
    masking_utils = pytest.importorskip("transformers.masking_utils")

    class Cutting(torch.nn.Module):
        def _maybe_slice_kv_shared_inputs(self, hidden, causal_mask_mapping, keep, cache=None):
            cut = {kind: None if mask is None else mask[:, :, -keep:, :] for kind, mask in causal_mask_mapping.items()}
            return hidden[:, -keep:], cut

    by_class, cutting, other = Cutting.__dict__["_maybe_slice_kv_shared_inputs"], Cutting(), Cutting()
    for _ in range(2):
        integration._pass_masks_through(cutting)
    assert Cutting.__dict__["_maybe_slice_kv_shared_inputs"] is by_class
    assert "_maybe_slice_kv_shared_inputs" in vars(cutting) and "_maybe_slice_kv_shared_inputs" not in vars(other)
    ours = _masks.key_padding_mask(2, 6, 6, attention_mask=torch.ones(2, 6, dtype=torch.bool),
                                        mask_function=masking_utils.causal_mask_function)
    theirs, hidden = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril(), torch.randn(2, 6, 4)
    for call in (lambda masks: cutting._maybe_slice_kv_shared_inputs(hidden, masks, 1),
                 lambda masks: cutting._maybe_slice_kv_shared_inputs(hidden, keep=1, causal_mask_mapping=masks)):
        kept, masks = call({"full_attention": ours, "other": theirs})
        assert torch.equal(kept, hidden[:, -1:]) and masks["full_attention"] is ours
        assert torch.equal(masks["other"], theirs[:, :, -1:, :])
        assert torch.equal(call({"other": theirs})[1]["other"], theirs[:, :, -1:, :])
    with pytest.raises(IndexError):  # the other module cuts fastprobe's 2D mask as a 4D one
        other._maybe_slice_kv_shared_inputs(hidden, {"full_attention": ours}, 1)


def test_mask_function_on_a_static_cache():
    """A static cache's buffer of kv_length slots: the mask covers the slots that hold tokens. A
    decoding step with generate's mask (one column per token so far) needs no host read of the
    tensor offset (a meta tensor here: reading it would raise) and, for a compilable cache, comes
    as [B, 1, 1, Lk]; other calls read the offset; queries past the keys are refused when used."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    fp.patch(tiny_model("llama"))  # registers the key
    function = masking_utils.AttentionMaskInterface()["fastprobe"]
    causal = masking_utils.causal_mask_function
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    offset = torch.empty((), dtype=torch.int64, device="meta")
    step = function(batch_size=2, q_length=1, kv_length=16, q_offset=offset, kv_offset=0, attention_mask=mask,
                    mask_function=causal, allow_is_causal_skip=False)
    assert step.shape == (2, 1, 1, 5) and torch.equal(step[:, 0, 0], mask) and step._fastprobe_pattern.static
    assert function(batch_size=2, q_length=1, kv_length=16, q_offset=offset, attention_mask=mask,
                    mask_function=causal).shape == (2, 5)  # a dynamic-cache-like call keeps the 2D form
    chunk = function(batch_size=2, q_length=3, kv_length=16, q_offset=torch.tensor(4), attention_mask=None,
                     mask_function=causal, device="cpu")
    assert chunk.shape == (2, 7) and bool(chunk.all()) and chunk._fastprobe_pattern.static
    full = function(batch_size=2, q_length=3, kv_length=7, q_offset=torch.tensor(4), attention_mask=None,
                    mask_function=causal, device="cpu")
    assert full.shape == (2, 7) and not full._fastprobe_pattern.static
    beyond = function(batch_size=2, q_length=3, kv_length=7, q_offset=6, attention_mask=None, mask_function=causal,
                      device="cpu")
    assert "queries start at position 6" in beyond._fastprobe_pattern.refused


# ---------------------------------------------------------------- refusals


def test_refuses_architectures_without_the_attention_interface():
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    before = t5.config._attn_implementation
    with pytest.raises(NotImplementedError, match="AttentionInterface"):
        fp.patch(t5)
    assert not is_patched(t5) and t5.config._attn_implementation == before
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                       intermediate_size=64, image_size=28, patch_size=14))
    if getattr(type(vit), "_supports_attention_backend", False):  # (a marked encoder with no layer to patch)
        with pytest.raises(NotImplementedError, match=r"none of its attention modules \(ViT.*a vision or audio encoder"):
            fp.patch(vit)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fp.patch(torch.nn.Linear(4, 4))


def _composite(name: str):
    """Small composite models whose parts fastprobe cannot run (None where this transformers lacks
    the classes or cannot build them), and one it can (BLIP-2 with an OPT language model)."""
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                 patch_size=14)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0)
    gemma_text = dict(text, head_dim=16, query_pre_attn_scalar=16, sliding_window=4, bos_token_id=2,
                      eos_token_id=1, layer_types=["full_attention", "full_attention"])
    qformer = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                   encoder_hidden_size=32, vocab_size=300)
    make = {
        "blip2_t5": lambda: transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
            vision_config=tower, qformer_config=qformer, num_query_tokens=4, image_token_index=299,
            text_config=dict(model_type="t5", vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=1,
                             num_heads=4))),
        "blip2_opt": lambda: transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(
            vision_config=tower, qformer_config=qformer, num_query_tokens=4, image_token_index=299,
            text_config=dict(model_type="opt", vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                             num_attention_heads=4, word_embed_proj_dim=64))),
        "llava_data2vec_tower": lambda: transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
            vision_config=dict(tower, model_type="data2vec-vision"), text_config=dict(text, model_type="llama"),
            image_token_index=299, vision_feature_layer=-1, vision_feature_select_strategy="full")),
        "kosmos2": lambda: transformers.Kosmos2ForConditionalGeneration(transformers.Kosmos2Config(
            text_config=dict(vocab_size=300, embed_dim=64, layers=1, attention_heads=4, ffn_dim=128),
            vision_config=tower, latent_query_num=4)),
        "t5gemma2": lambda: transformers.T5Gemma2ForConditionalGeneration(transformers.T5Gemma2Config(
            encoder=dict(text_config=gemma_text, mm_tokens_per_image=4, boi_token_index=295, eoi_token_index=296,
                         image_token_index=297, vision_config=dict(tower, model_type="siglip_vision_model",
                                                                   patch_size=7)),
            decoder=gemma_text, image_token_index=297, eoi_token_index=296, tie_word_embeddings=False)),
    }[name]
    try:
        return make().eval()
    except (AttributeError, ImportError, TypeError, ValueError, KeyError):
        return None


@pytest.mark.parametrize("name, words", [
    ("blip2_t5", r"its language_model\.encoder \(T5Stack\) has attention of its own, and transformers does not mark"),
    ("llava_data2vec_tower", r"its model\.vision_tower \(Data2VecVisionModel\) has attention of its own"),
    ("kosmos2", r"Kosmos2TextTransformer \(_prepare_decoder_attention_mask\) builds its own \[L, L\] masks"),
    ("t5gemma2", r"T5Gemma2MergedAttention attends to its own tokens and another sequence's \(the encoder's\) in one"),
])
def test_refuses_composite_models_with_parts_it_cannot_run(name, words):
    """A marked model may hold parts that fastprobe cannot run, refused at patch rather than at the
    first forward or not at all: an unmarked sub-model (BLIP-2's T5, whose position bias failed in
    the first forward; a LLaVA's data2vec-vision tower, which kept its own attention), a sub-model
    that builds its own 4D masks (Kosmos-2: every forward failed), and T5Gemma 2's decoder, whose
    merged self- and cross-attention ran its own tokens both ways (logits 0.30 off eager)."""
    model = _composite(name)
    if model is None:
        pytest.skip(f"transformers {transformers.__version__} cannot build {name} here")
    if not getattr(type(model), "_supports_attention_backend", False):
        pytest.skip(f"transformers {transformers.__version__} does not mark {type(model).__name__}")
    before = [config._attn_implementation for config in _lookups._configs(model)]
    qformer_marked = getattr(getattr(transformers, "Blip2QFormerModel", None), "_supports_attention_backend", False)
    if int(transformers.__version__.split(".")[0]) < 5 or (name == "blip2_t5" and not qformer_marked):
        words = "cannot patch"  # (4.5x refuses BLIP-2's Q-Former, Kosmos-2's attention first; 5.0 the Q-Former)
    with pytest.raises(NotImplementedError, match=words):
        fp.patch(model)
    assert not is_patched(model) and [config._attn_implementation for config in _lookups._configs(model)] == before
    if name == "blip2_t5" and qformer_marked:  # the same model with an OPT language model is patched
        other = _composite("blip2_opt")
        if other is not None and routes_through_interfaces(other.language_model):
            assert [type(layer).__name__ for layer in attention_layers(fp.patch(other))] == ["OPTAttention"]


def test_refuses_a_plain_module_that_builds_its_own_masks():
    """A module that builds its own [L, L] masks is refused at patch even when it is a plain
    nn.Module, not a sub-model: transformers 5.0's Kosmos2TextTransformer (patched before, its every
    forward then failed on the 4D mask it handed fastprobe's attention)."""
    class OwnMasks(torch.nn.Module):
        def _prepare_decoder_attention_mask(self, *args):
            return None

    model = tiny_model("llama")
    model.model.own_masks = OwnMasks()
    with pytest.raises(NotImplementedError, match=r"OwnMasks \(_prepare_decoder_attention_mask\) builds its own"):
        fp.patch(model)
    assert not is_patched(model)


def test_forward_that_skips_fastprobe_raises():
    """The safety net: a patched model whose forward never reached fastprobe's attention, its
    implementation switched back behind fastprobe's back (named as such) or its attention
    modules not calling the attention interface."""
    model = fp.patch(tiny_model("llama"))
    model.config._attn_implementation_internal = "sdpa"
    ids, mask = inputs()
    with pytest.raises(RuntimeError, match="switched to 'sdpa' since .*, so this forward ran without fastprobe"):
        outputs(model, ids, mask)
    model = fp.patch(tiny_model("llama"))
    for layer in model.model.layers:
        layer.self_attn.forward = lambda hidden_states, **kwargs: (torch.zeros_like(hidden_states), None)
    with pytest.raises(RuntimeError, match="without calling fastprobe's attention: its attention does not go"):
        outputs(model, ids, mask)


@pytest.mark.parametrize("arch", CAUSAL)
def test_attention_weights_are_refused_in_forward_and_generate(arch):
    """output_attentions=True is refused by every patched causal model, in a forward and through
    generate, never answered with an empty tuple of weights: GPT-2's model (transformers 5.x) pops
    the flag before its layers and collects their outputs' weights, which fastprobe leaves None.
    The refused call leaves the model working."""
    model = patch_or_skip(tiny_model(arch))
    ids, mask = inputs(padding="left")
    with pytest.raises(NotImplementedError, match="output_attentions"):
        outputs(model, ids, mask, output_attentions=True)
    with pytest.raises(NotImplementedError, match="output_attentions"), torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                       output_attentions=True, return_dict_in_generate=True)
    assert_real_close(outputs(model, ids, mask), outputs(tiny_model(arch), ids, mask), mask)


def test_refuses_what_it_cannot_reproduce():
    model = fp.patch(tiny_model("llama"))
    ids, mask = inputs()
    with pytest.raises(NotImplementedError, match="4D mask"):
        outputs(model, ids, torch.ones(3, 1, LENGTH, LENGTH, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="output_attentions"):
        outputs(model, ids, mask, output_attentions=True)
    model.train()
    with pytest.raises(RuntimeError, match=r"forward-only.*after fastprobe\.unpatch\(model\)"):
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    model.config.attention_dropout = 0.1
    for layer in attention_layers(model):
        layer.attention_dropout = 0.1
    with pytest.raises(NotImplementedError, match="dropout"):
        model(input_ids=ids, attention_mask=mask)


def test_loss_and_router_kwargs_pass_the_attention(tmp_path):
    """Keyword arguments a model passes down to its attention that are the loss's or the routers'
    business, not the attention's: the Trainer's num_items_in_batch (evaluate, predict) and a
    mixture-of-experts model's output_router_logits. Both were refused ("an argument fastprobe does
    not know how to honour"), so Trainer.evaluate() of a patched model failed."""
    reference, model = tiny_model("llama"), fp.patch(tiny_model("llama"))
    ids, mask = inputs()
    labels = ids.masked_fill(mask == 0, -100)
    # nor the first real token after left padding: the last padded query predicts it, and padded queries'
    # outputs are unspecified (with torch < 2.5 transformers makes them attend to every key; fastprobe gives 0)
    labels[:, 1:].masked_fill_(mask[:, :-1] == 0, -100)
    count = (labels[:, 1:] != -100).sum()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=count).loss
        got = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=count).loss
    torch.testing.assert_close(got, want)
    rows = [{"input_ids": row[m.bool()].tolist(), "labels": row[m.bool()].tolist()} for row, m in zip(ids, mask)]
    losses = []
    for each in (reference, model):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[],
                                              use_cpu=True, prediction_loss_only=True)
        def collator(batch):
            def padded(name, value):
                return torch.nn.utils.rnn.pad_sequence([torch.tensor(r[name]) for r in batch], batch_first=True,
                                                       padding_value=value)
            return {"input_ids": padded("input_ids", 0), "labels": padded("labels", -100),
                    "attention_mask": padded("labels", -100) != -100}
        losses.append(transformers.Trainer(model=each, args=args, eval_dataset=rows,
                                           data_collator=collator).evaluate()["eval_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, pad_token_id=0)
    torch.manual_seed(0)
    reference = transformers.MixtralForCausalLM(config).eval()
    model = fp.patch(copy.deepcopy(reference))
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        got = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got.aux_loss, want.aux_loss)
    if "return_seq_idx" in inspect.signature(transformers.DataCollatorWithFlattening).parameters:
        # packed sequences with their index (for state-space layers): each attends within itself, as unpatched
        rows = [{"input_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask)]
        packed = transformers.DataCollatorWithFlattening(return_seq_idx=True)(rows)
        reference, model = tiny_model("llama"), fp.patch(tiny_model("llama"))
        with torch.no_grad():
            want = reference(**packed, use_cache=False).logits
            got = model(**packed, use_cache=False).logits
        torch.testing.assert_close(got, want, **TOLERANCE)


def test_num_sink_refused_when_the_sliding_cache_dropped_the_sinks():
    reference, model = tiny_model("mistral"), fp.patch(tiny_model("mistral"), num_sink=1)
    ids, mask = inputs(padding="none")
    outputs(model, ids, mask)  # prefill: fine
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        cache = generated_cache(reference.generate(ids, return_dict_in_generate=True, **settings))
        if cached_keys_values(cache, 0)[0].shape[2] >= LENGTH:  # before 4.56 the dynamic cache keeps every token
            model.generate(ids, **settings)  # so num_sink is honoured while decoding
            pytest.skip(f"transformers {transformers.__version__}'s dynamic cache keeps every token: none to refuse")
        with pytest.raises(NotImplementedError, match="dropped the first tokens"):
            model.generate(ids, **settings)


def test_num_sink_refused_in_a_chunked_prefill_past_the_window_says_so():
    """A chunked prefill (generate's prefill_chunk_size) whose later chunks come after the sliding
    cache dropped the first tokens is refused as decoding is, in words that name the chunked
    prefill (it said "while decoding", and advised a prefill, which it was)."""
    reference, model = tiny_model("mistral"), fp.patch(tiny_model("mistral"), num_sink=1)
    ids, mask = inputs(padding="none")
    settings = dict(max_new_tokens=1, do_sample=False, prefill_chunk_size=4)
    with torch.no_grad():
        cache = generated_cache(reference.generate(ids, return_dict_in_generate=True, **settings))
        if cached_keys_values(cache, 0)[0].shape[2] >= LENGTH:  # before 4.56 the dynamic cache keeps every token
            pytest.skip(f"transformers {transformers.__version__}'s dynamic cache keeps every token: none to refuse")
        with pytest.raises(NotImplementedError, match="dropped the first tokens") as refused:
            model.generate(ids, **settings)
    message = str(refused.value)
    assert "chunked prefill (generate's prefill_chunk_size)" in message and "decoding" not in message
    with torch.no_grad(), pytest.raises(NotImplementedError, match="while decoding past the window"):
        model.generate(ids, max_new_tokens=3, do_sample=False)


def test_recording_stat_tokens_refused_when_the_sliding_cache_dropped_them():
    """Recording with stat_tokens > 1 while decoding past a sliding window, whose cache dropped the
    first tokens, is refused as num_sink is (their weight can no longer be summed)."""
    reference, model = tiny_model("mistral"), fp.patch(tiny_model("mistral"), stat_tokens=2)
    ids, mask = inputs(padding="none")
    settings = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        cache = generated_cache(reference.generate(ids, return_dict_in_generate=True, **settings))
        if cached_keys_values(cache, 0)[0].shape[2] >= LENGTH:  # before 4.56 the dynamic cache keeps every token
            pytest.skip(f"transformers {transformers.__version__}'s dynamic cache keeps every token: none to refuse")
        model.generate(ids, **settings)  # (not recording: stat_tokens is the record's alone)
        with fp.record_attention(model), pytest.raises(NotImplementedError, match="dropped the first tokens"):
            model.generate(ids, **settings)


# ---------------------------------------------------------------- recording vs eager weights


class ReadBacks(TorchDispatchMode):
    """The ops that read a tensor's value back to Python (a host sync on a GPU) run inside it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("is_nonzero", "_local_scalar_dense", "item"):
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_recorded_sink_mass_matches_eager_weights(arch):
    eager, model = tiny_model(arch, attn_implementation="eager"), patch_or_skip(tiny_model(arch))
    ids, mask = inputs()
    with torch.no_grad():
        weights = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with fp.record_attention(model) as record:
            model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(record.sink_mass, eager_sink_mass(weights, mask, chunked=arch == "llama4"), **TOLERANCE)
    assert record.group_mass is None and record.entropy is None
    assert record.num_queries.tolist() == [mask.sum().item()] * len(weights)


@pytest.mark.parametrize("batch, padded", [(1, False), (3, False), (1, True)])
def test_recording_one_row_or_no_mask_matches_eager_weights(batch, padded):
    """Batch 1 (the recorder sums its statistics over the queries as a matrix-vector product,
    weighted by the real queries when padded) and forwards given no attention mask (no key padding
    mask, query counts kept on the host): the record the eager weights give, pooled over two
    forwards, and read without waiting for the device."""
    eager, model = tiny_model("qwen3", attn_implementation="eager"), fp.patch(tiny_model("qwen3"))
    ids, mask = inputs(batch=batch, padding="none")
    mask[0, -4:] = 0 if padded else 1  # right padding: its padded queries see real keys
    given = mask if padded else None
    groups = torch.randint(0, 3, ids.shape)
    forwards = [(ids, given), (ids[:, :9], None if given is None else given[:, :9])]  # the second shorter
    with torch.no_grad():
        with fp.record_attention(model, key_groups=groups, num_groups=3, statistics=STATISTICS) as record:
            for each, each_mask in forwards:
                model(input_ids=each, attention_mask=each_mask)
            with ReadBacks() as watched:
                fields = record.sink_mass, record.entropy, record.group_mass, record.num_queries
        weights = [eager(input_ids=each, attention_mask=each_mask, output_attentions=True).attentions
                   for each, each_mask in forwards]
    assert watched.seen == []
    one_hot = torch.nn.functional.one_hot(groups, 3).float()  # [B, L, G]
    first = first_real(mask).view(-1, 1, 1, 1)
    count = mask.sum() + mask[:, :9].sum()

    def pooled(statistic):  # [layers, H, ...] over the real queries of both forwards
        sums = []
        for layer in range(len(weights[0])):
            total = 0
            for forward, (each, _) in zip(weights, forwards):
                w = forward[layer]
                values = statistic(w)
                real = mask[:, :each.shape[1]].bool().view(batch, 1, -1, *([1] * (values.dim() - 3)))
                total = total + (values * real).sum((0, 2))
            sums.append(total / count)
        return torch.stack(sums)

    on_first = pooled(lambda w: w.gather(-1, first.expand(*w.shape[:3], 1))[..., 0])
    torch.testing.assert_close(fields[0], on_first, **TOLERANCE)
    torch.testing.assert_close(fields[1], pooled(lambda w: -torch.xlogy(w, w).sum(-1)), **TOLERANCE)
    torch.testing.assert_close(fields[2], pooled(lambda w: w @ one_hot[:, None, :w.shape[-1]]), **TOLERANCE)
    assert fields[3].tolist() == [count.item()] * len(weights[0])
    fields[3].zero_()  # a copy: the record's own counts stay
    assert record.num_queries.tolist() == [count.item()] * len(weights[0])


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # plain causal; sliding windows with a soft cap
def test_torch_compile_of_a_patched_model(arch):
    """torch.compile (Dynamo + AOTAutograd over the ops' fake implementations) of a patched model
    gives the eager outputs, and record_attention still records inside the compiled forward."""
    torch._dynamo.reset()  # (other tests' compiles of transformers' frames count towards the recompile limit)
    reference, model = tiny_model(arch), fp.patch(tiny_model(arch))
    compiled = torch.compile(model, backend="aot_eager")
    ids, mask = inputs()
    assert_real_close(outputs(compiled, ids, mask), outputs(reference, ids, mask), mask)
    with torch.no_grad():
        with fp.record_attention(model) as eager_record:
            model(input_ids=ids, attention_mask=mask)
        with fp.record_attention(model) as compiled_record:
            compiled(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(compiled_record.sink_mass, eager_record.sink_mass, **TOLERANCE)
    assert compiled_record.num_queries.tolist() == eager_record.num_queries.tolist()


def test_an_option_change_without_guidance_does_not_recompile_the_hooks():
    """update_patch that leaves guidance off (here with the options as they are) keeps the
    forward's state: the compiled forward is not compiled again (a version of the options, which
    the forward hook reads, was bumped at every change, a recompile per update_patch)."""
    from torch._dynamo.utils import counters

    model = fp.patch(tiny_model("llama"))
    compiled = torch.compile(model, backend="aot_eager")
    ids, _ = inputs()
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            for _ in range(2):  # (the first calls fill what the forward reads once)
                compiled(input_ids=ids)
            counters.clear()
            for _ in range(3):
                update_patch(model, window=None)
                compiled(input_ids=ids)
        assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    finally:
        torch._dynamo.reset()


@skip_without_compile_reference
@pytest.mark.skipif(TORCH_RELEASE < (2, 8), reason="Dynamo before torch 2.8 (2.7 checked) cannot set an attribute on "
                    "a tensor, which is how fastprobe's masks carry their pattern: a fullgraph compile refuses")
def test_a_fresh_patched_model_compiles_whole_and_exports(monkeypatch):
    """A patched model compiles with fullgraph=True (its mask functions' names were read through
    __qualname__, a graph break) on its first call (the mask pattern was evaluated on fake tensors
    unless an eager forward had cached it), one graph over prompt lengths while recording (the
    record's query weights were cached under the symbolic length: a graph per length), and exports
    with a dynamic sequence length (int(q_length) fixed it at the example's)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setattr(_masks, "_PATTERNS", {})  # (as in a fresh process)
    torch._dynamo.reset()
    reference, model = tiny_model("llama"), fp.patch(tiny_model("llama"))
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for length in (6, 9, 12, 15):
            ids, mask = torch.randint(3, 100, (2, length)), torch.ones(2, length, dtype=torch.long)
            mask[0, :2] = 0
            with fp.record_attention(model) as record:
                # before torch 2.11 (checked: 2.8) dynamo cannot trace transformers 5.x building a
                # DynamicCache from the config (unpatched models neither), not what is tested here
                got = compiled(input_ids=ids, attention_mask=mask, use_cache=TORCH_RELEASE >= (2, 11)).logits
            assert_real_close(got, reference(input_ids=ids, attention_mask=mask).logits, mask)
            assert record.num_queries.tolist() == [mask.sum().item()] * 2
    assert counter.frame_count <= 2

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, mask):
            return self.inner(input_ids=ids, attention_mask=mask, use_cache=False).logits

    monkeypatch.setattr(_masks, "_PATTERNS", {})
    length = torch.export.Dim("length", min=3, max=64)
    ids, mask = torch.randint(3, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    exported = torch.export.export(Logits(model), (ids, mask), dynamic_shapes=({1: length}, {1: length}),
                                   strict=False)
    ids, mask = torch.randint(3, 100, (2, 11)), torch.ones(2, 11, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(ids, mask), reference(input_ids=ids, attention_mask=mask).logits,
                                   **TOLERANCE)


def test_recorded_entropy_and_group_mass_match_eager_weights():
    eager, model = tiny_model("qwen3", attn_implementation="eager"), fp.patch(tiny_model("qwen3"))
    ids, mask = inputs()
    groups = torch.randint(0, 3, ids.shape)
    with torch.no_grad():
        weights = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with fp.record_attention(model, key_groups=groups, num_groups=3, statistics=("sink_mass", "entropy")) as record:
            model(input_ids=ids, attention_mask=mask)
    real = mask.bool()[:, None, :, None]
    count = mask.sum()
    one_hot = torch.nn.functional.one_hot(groups, 3).float()  # [B, L, G]
    entropy = torch.stack([(-torch.xlogy(w, w).sum(-1, keepdim=True) * real).sum((0, 2))[:, 0] / count
                           for w in weights])
    group_mass = torch.stack([((w @ one_hot[:, None]) * real).sum((0, 2)) / count for w in weights])
    torch.testing.assert_close(record.entropy, entropy, **TOLERANCE)
    torch.testing.assert_close(record.group_mass, group_mass, **TOLERANCE)
    torch.testing.assert_close(record.group_mass.sum(-1), torch.ones(2, 4), **TOLERANCE)


def test_a_statistic_named_twice_is_recorded_once():
    """statistics (and the patch option record) naming a statistic twice record it once: each name
    added the call's sums to its table, so sink_mass came out twice the weight (above 1)."""
    model = fp.patch(tiny_model("llama"), record=["sink_mass", "sink_mass"])
    ids, mask = inputs()
    with torch.no_grad():
        with fp.record_attention(model, statistics=("sink_mass", "entropy")) as want:
            model(input_ids=ids, attention_mask=mask)
        with fp.record_attention(model, statistics=("sink_mass", "entropy", "sink_mass", "entropy")) as got:
            model(input_ids=ids, attention_mask=mask)
        with fp.record_attention(model) as by_option:
            model(input_ids=ids, attention_mask=mask)
    assert got.statistics == ("sink_mass", "entropy") and by_option.statistics == ("sink_mass",)
    torch.testing.assert_close(got.sink_mass, want.sink_mass, **TOLERANCE)
    torch.testing.assert_close(got.entropy, want.entropy, **TOLERANCE)
    torch.testing.assert_close(by_option.sink_mass, want.sink_mass, **TOLERANCE)


def tiny_t5gemma(**kwargs):
    """A small T5Gemma (encoder-decoder: bidirectional encoder, causal decoder with cross-attention)."""
    if not hasattr(transformers, "T5GemmaConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no T5Gemma")
    module = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  dropout_rate=0.0, attention_dropout=0.0, layer_types=["sliding_attention", "full_attention"])
    config = transformers.T5GemmaConfig(encoder=module, decoder=module, vocab_size=VOCAB, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2, dropout_rate=0.0, attention_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.AutoModelForSeq2SeqLM.from_config(config, **kwargs).eval()


def test_mllama_text_is_patched_and_its_vision_towers_mask_is_refused_by_name():
    """Mllama patches: its text self-attention runs fastprobe's attention (text alone: the
    unpatched logits); its vision tower's attention gets a 4D mask (padded patches masked as
    queries and keys), which fastprobe's attention does not take: refused at the forward, naming
    the module (the error named none)."""
    if not hasattr(transformers, "MllamaConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Mllama")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=28, patch_size=14, max_num_tiles=1, vision_output_dim=64, intermediate_layers_indices=[0],
                  supported_aspect_ratios=[[1, 1]])
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=VOCAB, cross_attention_layers=[1], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if int(transformers.__version__.split(".")[0]) < 5:  # (4.5x's Mllama rotary embedding has no default rope_scaling)
        text["rope_scaling"] = {"rope_type": "default"}
    config = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB - 1)
    model = transformers.MllamaForConditionalGeneration._from_config(config).eval()
    ids, mask = inputs()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        patch_or_skip(model)  # (4.5x's Mllama builds its own masks: refused, checked)
        assert_real_close(model(input_ids=ids, attention_mask=mask).logits, want, mask)
        ids[:, 0] = VOCAB - 1
        cross = torch.ones(ids.shape[0], ids.shape[1], 1, 1, dtype=torch.long)  # [B, L, images, tiles]
        images = dict(pixel_values=torch.randn(ids.shape[0], 1, 1, 3, 28, 28), cross_attention_mask=cross,
                      aspect_ratio_ids=torch.ones(ids.shape[0], 1, dtype=torch.long),
                      aspect_ratio_mask=torch.ones(ids.shape[0], 1, 1, dtype=torch.long))
        with pytest.raises(NotImplementedError, match="MllamaVisionAttention gave it a 4D mask"):
            model(input_ids=ids, attention_mask=mask, **images)


def test_an_encoder_decoders_key_groups_are_its_encoders_tokens():
    """Key groups [B, L] give the groups of the forward's input_ids: in an encoder-decoder (T5Gemma)
    the encoder's tokens. Its decoder layers attend to the decoder's own tokens, so they take none
    (NaN, as a vision tower's layers): they read the encoder tokens' groups at their positions, and
    a decoder longer than the encoder's input was refused for want of groups."""
    eager = tiny_t5gemma(attn_implementation="eager")
    model = fp.patch(copy.deepcopy(eager))
    ids, mask = inputs()
    groups = torch.randint(0, 3, ids.shape)
    decoder_ids = torch.randint(3, VOCAB, (ids.shape[0], LENGTH + 3))
    with torch.no_grad():
        weights = unless_masks_need_newer_torch(lambda: eager(  # (the unpatched model's own masks)
            input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids[:, :2], output_attentions=True),
            what="T5Gemma's masks").encoder_attentions
        with fp.record_attention(model, key_groups=groups, num_groups=3) as record:
            try:
                model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
            except NotImplementedError as error:  # (checked: the refusal names T5Gemma's own mask function)
                if "transformers.models.t5gemma.modeling_t5gemma." not in str(error):
                    raise
                pytest.skip(f"transformers {transformers.__version__}'s T5Gemma builds its masks with its own "
                            "functions, which fastprobe refuses")
    real = mask.bool()[:, None, :, None]
    one_hot = torch.nn.functional.one_hot(groups, 3).float()  # [B, L, G]
    group_mass = torch.stack([((w @ one_hot[:, None]) * real).sum((0, 2)) / mask.sum() for w in weights])
    torch.testing.assert_close(record.group_mass[:2], group_mass, **TOLERANCE)
    assert record.group_mass[2:].isnan().all() and not record.sink_mass.isnan().any()


def test_recorded_key_groups_are_checked_once_per_batch(monkeypatch):
    """The recorder checks its key groups when they are set (bad ids are refused there), not in
    every layer's call, and gives each forward the groups of its tokens' positions: forwards of
    two lengths pool to the group masses of the eager weights; a longer one is refused."""
    eager, model = tiny_model("llama", attn_implementation="eager"), fp.patch(tiny_model("llama"))
    ids, mask = inputs()
    groups = torch.randint(0, 3, ids.shape)
    batches = [(ids, mask), (ids[:, :-4], mask[:, :-4]), (ids, mask)]
    checks = []
    check = fp.ops.attention._checked_group_ids
    monkeypatch.setattr(fp.ops.attention, "_checked_group_ids", lambda *args: checks.append(1) or check(*args))
    sums, count = 0, 0
    with torch.no_grad():
        with fp.record_attention(model, key_groups=groups, num_groups=3, statistics=("group_mass",)) as record:
            for batch_ids, batch_mask in batches:
                model(input_ids=batch_ids, attention_mask=batch_mask)
        for batch_ids, batch_mask in batches:
            weights = eager(input_ids=batch_ids, attention_mask=batch_mask, output_attentions=True).attentions
            one_hot = torch.nn.functional.one_hot(groups[:, :batch_ids.shape[1]], 3).float()  # [B, Lk, G]
            real = batch_mask.bool()[:, None, :, None]
            sums = sums + torch.stack([((w @ one_hot[:, None]) * real).sum((0, 2)) for w in weights])
            count += batch_mask.sum()
    assert len(checks) == 1  # when set; not in the 3 x 4 layers' calls
    torch.testing.assert_close(record.group_mass, sums / count, **TOLERANCE)
    with pytest.raises(ValueError, match=r"key_groups must hold ids in \[0, num_groups = 2\)"):
        record.set_key_groups(groups + 1, num_groups=2)
    with pytest.raises(ValueError, match="key_groups has shape"):  # a prompt longer than its groups
        with fp.record_attention(model, key_groups=groups[:, :-1]), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)


def test_group_mass_averages_over_the_forwards_with_key_groups():
    """Key groups set mid-record: group_mass averages over the forwards that had them (sink_mass
    over all); more groups set later widen group_mass, the earlier forwards' weight on the new
    group 0 (the table was replaced by zeros and still divided by every forward's queries)."""
    eager, model = tiny_model("llama", attn_implementation="eager"), fp.patch(tiny_model("llama"))
    ids, mask = inputs()
    three = torch.randint(0, 3, ids.shape)
    four = torch.where(torch.rand(ids.shape) < 0.3, 3, three)
    with torch.no_grad():
        weights = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with fp.record_attention(model, statistics=("sink_mass", "group_mass")) as record:
            model(input_ids=ids, attention_mask=mask)  # no groups: in sink_mass only
            record.set_key_groups(three, 3)
            model(input_ids=ids, attention_mask=mask)
            record.set_key_groups(four, 4)
            model(input_ids=ids, attention_mask=mask)
    real = mask.bool()[:, None, :, None]

    def sums(groups):  # [layers, H, 4]
        one_hot = torch.nn.functional.one_hot(groups, 4).float()
        return torch.stack([((w @ one_hot[:, None]) * real).sum((0, 2)) for w in weights])

    torch.testing.assert_close(record.group_mass, (sums(three) + sums(four)) / (2 * mask.sum()), **TOLERANCE)
    torch.testing.assert_close(record.group_mass.sum(-1), torch.ones(2, 4), **TOLERANCE)
    with torch.no_grad(), fp.record_attention(model) as once:
        model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(record.sink_mass, once.sink_mass, **TOLERANCE)  # (three forwards of the same)
    assert record.num_queries.tolist() == [3 * mask.sum().item()] * 2


def test_a_record_of_layers_with_different_head_counts():
    """Layers with other head counts than the first's (a vision tower beside a text model; a layer
    whose config says none) widen the tables to the most heads: each layer's columns past its own
    heads are NaN, the others its means, for the batched form and the one-row matrix-vector one."""
    record = integration.AttentionRecord(3, [2, 4, None], ("sink_mass", "entropy"), device=torch.device("cpu"))
    padding = torch.tensor([[False, True, True], [True, True, True]])
    want_sink, want_entropy = torch.full((3, 4), float("nan")), torch.full((3, 4), float("nan"))
    for layer, heads in ((0, 2), (1, 4), (2, 3)):
        sink_mass, entropy = torch.rand(2, heads, 3), torch.rand(2, heads, 3)
        record.add(layer, fp.AttentionOutput(None, None, sink_mass, None, entropy), padding, None)
        one_row = torch.rand(1, heads, 3)  # (no padding: one row, one matrix-vector product)
        record.add(layer, fp.AttentionOutput(None, None, one_row, None, one_row), None, None)
        weight = padding.float().view(2, 1, 3)
        want_sink[layer, :heads] = ((sink_mass * weight).sum((0, 2)) + one_row.sum((0, 2))) / 8
        want_entropy[layer, :heads] = ((entropy * weight).sum((0, 2)) + one_row.sum((0, 2))) / 8
    torch.testing.assert_close(record.sink_mass, want_sink, equal_nan=True)
    torch.testing.assert_close(record.entropy, want_entropy, equal_nan=True)
    assert record.num_queries.tolist() == [8, 8, 8]


def test_gemma4_with_a_vision_tower_of_other_heads():
    """Gemma 4 whose vision tower has 2 heads and text layers 4 (the record failed on a size
    mismatch): the record has 4 columns, NaN past the tower's 2; head_mask is checked against each
    layer's own heads (a [layers, heads] tensor cannot hold both: refused by name); score_heads on
    texts leaves out the tower, which texts never reach (its NaN rows failed the ranking), and
    prune_heads prunes each layer's own heads (it sized every layer by the tower's: refused, or
    zeroed another head's o_proj columns). Key groups (over tokens) skip the tower (over patches;
    more patches than tokens were refused)."""
    from fastprobe.methods import sinks

    tokenizer = fp.models.tiny_tokenizer()
    model = patch_or_skip(gemma4_vision_language_models(1, vision_heads=2, vocab_size=len(tokenizer))[0])
    ids, mask, images = gemma4_inputs()
    short = slice(5, 13)  # 8 tokens, the image's among them: fewer than its 16 patches
    groups = torch.randint(0, 3, (2, 8))
    with torch.no_grad(), fp.record_attention(model, key_groups=groups) as record:
        unless_masks_need_newer_torch(lambda: model(  # (its vision tower's masks)
            input_ids=ids[:, short], attention_mask=mask[:, short], pixel_values=images["pixel_values"],
            image_position_ids=images["image_position_ids"], mm_token_type_ids=images["mm_token_type_ids"][:, short]))
    assert record.sink_mass.shape == (5, 4) and record.heads_per_layer == [2, 4, 4, 4, 4]
    assert torch.isnan(record.sink_mass[0, 2:]).all()
    assert torch.isfinite(record.sink_mass[0, :2]).all() and torch.isfinite(record.sink_mass[1:]).all()
    assert torch.isnan(record.group_mass[0]).all() and torch.isfinite(record.group_mass[1:]).all()
    fp.patch(model, head_mask={0: [True, False], 1: [True] * 4})
    with pytest.raises(ValueError, match=r"head_mask\[0\] must have shape \[heads\] = \[2\]"):
        fp.patch(model, head_mask={0: [True] * 4})
    with pytest.raises(ValueError, match=r"needs one head count, but the layers have \[2, 4\] heads"):
        fp.patch(model, head_mask=torch.ones(5, 4, dtype=torch.bool))
    fp.patch(model)
    table = sinks.score_heads(model, tokenizer, fp.models.DEMO_TEXTS[:3], progress=False)
    assert sorted(set(table["layer"])) == [1, 2, 3, 4] and len(table) == 16
    assert sorted(table["rank"]) == list(range(1, 17)) and table["sink_score"].notna().all()
    handle = sinks.prune_heads(model, table, fraction=0.25)
    assert sorted(patch_options(model).head_mask) == sorted({layer for layer, _ in handle.heads})
    assert all(len(keep) == 4 for keep in patch_options(model).head_mask.values())
    handle.restore()
    weight = model.model.language_model.layers[0].self_attn.o_proj.weight
    before = weight.detach().clone()
    tower = model.model.vision_tower.encoder.layers[0].self_attn.o_proj.linear.weight
    tower_before = tower.detach().clone()
    with sinks.prune_heads(model, [(1, 1), (0, 1)], mode="zero_o_proj"):
        zeroed = (weight != before).any(0)
        assert zeroed.nonzero().flatten().tolist() == list(range(16, 32))  # head 1's 16 value dimensions
        assert (tower != tower_before).any(0).nonzero().flatten().tolist() == list(range(8, 16))
    with pytest.raises(ValueError, match=r"head \(0, 2\) is outside layer 0's 2 heads"):
        sinks.prune_heads(model, [(0, 2)])


def test_a_record_copies_as_a_snapshot_and_takes_prepared_key_groups():
    """copy.deepcopy (and pickle) of a record is a snapshot: later forwards change the record, not
    the copy, and the copy can record on its own (a lock of its own). set_key_groups takes the
    KeyGroups that prepare_key_groups made (num_groups, if given, must be its own) and refuses
    anything else by name."""
    import pickle

    model = fp.patch(tiny_model("llama"))
    ids, mask = inputs()
    groups = torch.randint(0, 3, ids.shape)
    prepared = fp.ops.attention.prepare_key_groups(groups, 3)
    with torch.no_grad(), fp.record_attention(model, statistics=("sink_mass", "group_mass")) as record:
        record.set_key_groups(prepared)
        model(input_ids=ids, attention_mask=mask)
        snapshot, pickled = copy.deepcopy(record), pickle.loads(pickle.dumps(record))
        model(input_ids=ids[:, :5], attention_mask=mask[:, :5])
    for copied in (snapshot, pickled):
        assert torch.equal(copied.num_queries, mask.sum().float().repeat(record.num_layers))
        assert not torch.equal(copied.sink_mass, record.sink_mass)
        torch.testing.assert_close(copied.group_mass.sum(-1), torch.ones_like(copied.sink_mass), **TOLERANCE)
        with copied._lock:  # its own
            assert not record._lock.locked()
    with pytest.raises(ValueError, match=r"num_groups \(4\) differs from the KeyGroups' \(3\)"):
        record.set_key_groups(prepared, num_groups=4)
    with pytest.raises(TypeError, match="key_groups must be an integer tensor"):
        record.set_key_groups(groups[0])
    record.set_key_groups(None)
    assert record._key_groups is None


def recorded_generate(arch: str, **record_options) -> tuple:
    """(record, mask, steps): record_attention(**record_options) through greedy generate of the
    left-padded inputs on the patched model, and the eager model's attention weights of the same
    generate, per step and layer [B, H, Lq, Lk] (the last Lk of the tokens seen so far)."""
    eager, model = tiny_model(arch, attn_implementation="eager"), fp.patch(tiny_model(arch))
    ids, mask = inputs(padding="left")
    settings = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        steps = eager.generate(ids, output_attentions=True, return_dict_in_generate=True, **settings).attentions
        with fp.record_attention(model, **record_options) as record:
            model.generate(ids, **settings)
    return record, mask, steps


def pooled_over_steps(steps, mask, statistic) -> torch.Tensor:
    """[layers, H, ...]: statistic(weights, offset) ([B, H, Lq, ...] from a step's weights and the
    position of their first key) averaged over the real queries of every step, per layer."""
    sums, count = 0, 0
    for step, layers in enumerate(steps):
        total = LENGTH + step  # tokens seen after this step's queries
        real = mask.bool() if step == 0 else torch.ones(3, 1, dtype=torch.bool)
        per_layer = []
        for weights in layers:
            values = statistic(weights, total - weights.shape[-1])
            weight = real.view(3, 1, real.shape[1], *([1] * (values.dim() - 3)))
            per_layer.append((values * weight).sum((0, 2)))
        sums = sums + torch.stack(per_layer)
        count += real.sum()
    return sums / count


@pytest.mark.parametrize("arch", ["llama", "gemma3", "llama4"])  # full cache; sliding cache dropping the first
def test_recording_through_generate_matches_eager_weights(arch):  # tokens; chunks (their own first tokens)
    """Pooled over the prefill and every decoding step; where a sliding cache has dropped a
    row's first token, its weight there is 0 (it is outside every query's window). Llama 4's
    chunked layers: the weight on the first token of the query's chunk."""
    record, mask, steps = recorded_generate(arch)
    first = first_real(mask)

    def on_first(weights, offset):
        if arch == "llama4":
            return weights.gather(-1, first_keys(weights, mask, chunked=True))[..., 0]
        index = (first - offset).clamp(min=0).view(3, 1, 1, 1).expand(*weights.shape[:3], 1)
        return weights.gather(-1, index)[..., 0] * (first >= offset).view(3, 1, 1)

    torch.testing.assert_close(record.sink_mass, pooled_over_steps(steps, mask, on_first), **TOLERANCE)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "llama4"])  # full cache; sliding cache; chunked layers
def test_recorded_group_mass_through_generate_matches_eager_weights(arch):
    """Groups given for the prompt's tokens: every decoding step's keys take the groups of their
    positions (a sliding cache's first kept key is not position 0), and the generated tokens are
    in none, so the pooled group mass is the eager weights' mass on each group of prompt tokens."""
    groups = torch.randint(0, 3, (3, LENGTH))
    record, mask, steps = recorded_generate(arch, key_groups=groups, num_groups=3, statistics=("group_mass",))

    def group_mass(weights, offset):  # [B, H, Lq, G]
        positions = torch.arange(offset, offset + weights.shape[-1])
        in_prompt = (positions < LENGTH).float()  # generated tokens: in no group
        one_hot = torch.nn.functional.one_hot(groups[:, positions.clamp(max=LENGTH - 1)], 3).float()
        return weights @ (one_hot * in_prompt[None, :, None])[:, None]

    torch.testing.assert_close(record.group_mass, pooled_over_steps(steps, mask, group_mass), **TOLERANCE)
    assert bool((record.group_mass.sum(-1) < 1 - 1e-3).all())  # some weight went to generated tokens


def test_reading_a_record_does_not_wait_for_the_device():
    """record.sink_mass (and its siblings) are device tensors computed without a host sync: no op
    that reads a value back to Python (bool or item of a tensor) runs while they are formed, so a
    loop that reads them each step on a GPU does not stall its stream. Seen on the CPU through the
    dispatcher's ops. The emptiness check ("nothing was recorded") counts calls on the host."""
    model = tiny_model("llama")
    ids, mask = inputs()
    with fp.record_attention(model, statistics=("sink_mass", "entropy")) as record:
        outputs(model, ids, mask)
        with ReadBacks() as watched:
            fields = record.sink_mass, record.entropy, record.num_queries
        assert watched.seen == [] and all(torch.isfinite(field).all() for field in fields)


def test_record_attention_patches_temporarily_and_nests_safely():
    model = tiny_model("llama")
    ids, mask = inputs()
    with fp.record_attention(model) as record:
        assert is_patched(model)
        with pytest.raises(RuntimeError, match="already active"):
            with fp.record_attention(model):
                pass
        with pytest.raises(RuntimeError, match="inside record_attention"):
            fp.unpatch(model)
        with pytest.raises(RuntimeError, match="nothing was recorded"):
            record.sink_mass
        outputs(model, ids, mask)
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"
    assert record.sink_mass.shape == (2, 4)
    with pytest.raises(ValueError, match="key_groups has shape"):
        with fp.record_attention(model, key_groups=torch.zeros(3, 5, dtype=torch.long)):
            outputs(model, ids, mask)


def test_record_attention_leaves_no_patch_behind_when_its_arguments_are_bad():
    model = tiny_model("llama")
    for bad, error, match in ((dict(statistics=["foo"]), ValueError, "statistics must name"),
                              (dict(key_groups=torch.zeros(3, 5)), TypeError, "key_groups must be"),
                              (dict(num_groups=3), ValueError, "^num_groups counts key_groups' groups")):  # (ignored)
        with pytest.raises(error, match=match):
            with fp.record_attention(model, **bad):
                pass
        assert not is_patched(model) and model.config._attn_implementation == "sdpa"


def test_key_groups_for_a_generate_that_expands_the_batch_say_how():
    model = tiny_model("llama")
    ids, mask = inputs(batch=2, padding="none")
    with pytest.raises(ValueError, match=r"num_return_sequences.*key_groups.repeat_interleave\(2, 0\)"):
        with fp.record_attention(model, key_groups=torch.zeros(2, LENGTH, dtype=torch.long)):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, num_beams=2, do_sample=False)
    groups = torch.arange(LENGTH).expand(2, LENGTH) % 3
    with fp.record_attention(model, key_groups=groups.repeat_interleave(2, 0), num_groups=3) as record:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, num_beams=2, do_sample=False)
    assert record.group_mass.shape == (2, 4, 3)


def test_concurrent_forwards_of_one_patched_model():
    """Forwards of one patched model in several threads at once: each thread tracks its own
    forward (the safety net's call counts once mixed, and a forward raised at random), and a
    record open meanwhile pools every thread's passes, none lost."""
    import threading

    model = fp.patch(tiny_model("llama"))
    batches = [inputs(padding=padding) for padding in ("none", "left", "mixed", "none")]
    want = [outputs(model, ids, mask) for ids, mask in batches]
    got, errors = {}, []

    def run(index):
        try:
            for _ in range(8):
                got[index] = outputs(model, *batches[index])
        except Exception as error:  # (reported below)
            errors.append(error)

    with fp.record_attention(model) as record:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    for index, (ids, mask) in enumerate(batches):
        assert_real_close(got[index], want[index], mask)
    real_queries = sum(int(mask.sum()) for _, mask in batches) * 8
    assert record.num_queries.tolist() == [real_queries] * 2


@pytest.mark.parametrize("group_mass", [False, True])
def test_a_record_opened_under_inference_mode_takes_another_threads_forwards(group_mass):
    """A record opened under torch.inference_mode (thread-local) pools the forwards of a thread
    that runs outside it, a streamer's generate thread: its sums once were inference tensors,
    which that thread's in-place additions failed on ("Inplace update to inference tensor outside
    InferenceMode"), and the forward with them."""
    import threading

    model = fp.patch(tiny_model("llama"))
    ids, mask = inputs()
    groups = dict(key_groups=torch.arange(LENGTH).expand(3, LENGTH) % 2, num_groups=2) if group_mass else {}
    with fp.record_attention(model, **groups) as want:
        outputs(model, ids, mask)
    errors = []

    def run():
        try:
            outputs(model, ids, mask)
        except Exception as error:  # (reported below)
            errors.append(error)

    with torch.inference_mode(), fp.record_attention(model, **groups) as record:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    assert errors == []
    assert record.num_queries.tolist() == want.num_queries.tolist()
    torch.testing.assert_close(record.sink_mass, want.sink_mass)
    if group_mass:
        torch.testing.assert_close(record.group_mass, want.group_mass)


def test_update_patch_from_another_thread_applies_from_the_next_forward():
    """update_patch while another thread's forward is between layers: that forward ends with the
    options it started with, and its next forward runs with the new ones (read per layer, the
    forward ran its first layer unmasked and its second masked: outputs of neither setting, in
    111 of 150 racing forwards)."""
    import threading

    model = fp.patch(tiny_model("llama"))
    ids, mask = inputs()
    heads = model.config.num_attention_heads
    pruned = {layer: [True] + [False] * (heads - 1) for layer in range(model.config.num_hidden_layers)}
    want_old = outputs(model, ids, mask)
    update_patch(model, head_mask=pruned)
    want_new = outputs(model, ids, mask)
    update_patch(model, head_mask={})
    first_layer_done, updated = threading.Event(), threading.Event()

    def pause_after_first_layer(module, args, output):
        first_layer_done.set()
        updated.wait(timeout=5.0)

    hook = attention_layers(model)[0].register_forward_hook(pause_after_first_layer)
    got = {}
    runner = threading.Thread(target=lambda: got.setdefault("old", outputs(model, ids, mask)))
    runner.start()
    assert first_layer_done.wait(timeout=5.0)
    hook.remove()
    update_patch(model, head_mask=pruned)
    updated.set()
    runner.join()
    assert_real_close(got["old"], want_old, mask)
    assert_real_close(outputs(model, ids, mask), want_new, mask)


def test_update_patch_from_two_threads_keeps_both_changes(monkeypatch):
    """Two threads changing different options with update_patch at once: the model ends with both
    changes (each read the options, then patched with them: the later patch dropped the other's
    change, 225 of 300 races with a tiny GIL switch interval)."""
    import threading

    model = fp.patch(tiny_model("llama"))
    first_read, second_done = threading.Event(), threading.Event()
    read_options = integration.patch_options

    def slow_read(target):  # (the first thread pauses between its read and its patch)
        options = read_options(target)
        if not first_read.is_set():
            first_read.set()
            second_done.wait(timeout=1.0)
        return options

    monkeypatch.setattr(integration, "patch_options", slow_read)

    def second():
        first_read.wait(timeout=5.0)
        update_patch(model, stat_tokens=3)
        second_done.set()

    threads = [threading.Thread(target=lambda: update_patch(model, num_sink=2)), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    options = read_options(model)
    assert (options.num_sink, options.stat_tokens) == (2, 3)


def test_record_attention_on_one_model_from_two_threads_lets_one_in(monkeypatch):
    """Two threads opening record_attention on one model at once: the second is refused, even
    when it comes while the first is between its check and its assignment (it once got in too,
    and the first to leave cleared the other's recorder: 43 of 200 races pooled or lost passes)."""
    import threading

    model = fp.patch(tiny_model("llama"))
    first_inside, second_done = threading.Event(), threading.Event()
    make_record = integration.AttentionRecord.__init__

    def slow_record(self, *args, **kwargs):  # (the first thread pauses before its assignment)
        make_record(self, *args, **kwargs)
        if not first_inside.is_set():
            first_inside.set()
            second_done.wait(timeout=1.0)

    monkeypatch.setattr(integration.AttentionRecord, "__init__", slow_record)
    outcomes = {}

    def first():
        with fp.record_attention(model):
            second_done.wait(timeout=5.0)  # (recording while the second tries)

    def second():
        first_inside.wait()
        try:
            with fp.record_attention(model):
                outcomes["second"] = "entered"
        except RuntimeError as error:
            outcomes["second"] = str(error)
        second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "already active" in outcomes["second"] and is_patched(model)
    assert getattr(model, integration._STATE).recorder is None


def test_a_record_is_read_whole_while_a_forward_adds_to_it():
    """Reading a record's fields (or copying it) while another thread's forward adds to it waits
    for that addition: a read between one call's sums and its query count once gave a sink mass
    0.854 for 0.342."""
    import copy
    import threading

    model = tiny_model("llama")
    ids, mask = inputs()
    with fp.record_attention(model) as record:
        outputs(model, ids, mask)
        for read in (lambda: record.sink_mass, lambda: record.num_queries, lambda: copy.deepcopy(record)):
            with record._lock:  # (an addition in progress)
                reader = threading.Thread(target=read)
                reader.start()
                reader.join(timeout=0.2)
                assert reader.is_alive()
            reader.join()


def test_a_sub_model_of_a_patched_model_is_patched_through_it():
    """patch / record_attention on a sub-model of a patched model (or the reverse) would replace
    the other's options and strip its patch on the way out: refused, naming the patched model."""
    model = fp.patch(tiny_model("llama"), head_mask={0: [True, False, False, True]})
    ids, mask = inputs()
    want = outputs(model, ids, mask)
    for attempt in (lambda: fp.patch(model.model), lambda: fp.record_attention(model.model).__enter__()):
        with pytest.raises(ValueError, match="already patched as part of a LlamaForCausalLM"):
            attempt()
    assert not is_patched(model.model) and 0 in patch_options(model).head_mask
    torch.testing.assert_close(outputs(model, ids, mask), want)
    fp.unpatch(model)
    inner = tiny_model("llama")
    fp.patch(inner.model)
    with pytest.raises(ValueError, match="already patched as part of a LlamaModel"):
        fp.patch(inner)
    fp.unpatch(inner.model)
    fp.unpatch(fp.patch(inner))


def test_two_models_sharing_a_config_unpatched_in_any_order_get_it_back():
    """Patched one after the other, the second sees the first's switch: each remembers the config's
    own implementation, and the config goes back only when neither patch is left."""
    for order in ("first, second", "second, first"):
        config = tiny_config("llama")
        config._attn_implementation = "eager"
        first = fp.patch(transformers.LlamaForCausalLM(config).eval())
        second = fp.patch(transformers.LlamaForCausalLM(config).eval())
        ids, mask = inputs()
        models = [first, second] if order == "first, second" else [second, first]
        fp.unpatch(models[0])
        assert config._attn_implementation == "fastprobe"  # the other still runs patched
        outputs(models[1], ids, mask)
        fp.unpatch(models[1])
        assert config._attn_implementation == "eager"
        for model in (first, second):
            assert outputs(model, ids, mask, output_attentions=True).shape[0] == 3  # eager gives weights again


def test_patched_with_restores_options_and_names_a_wrong_one():
    from fastprobe.integrations import patched_with

    model = fp.patch(tiny_model("llama"), stat_tokens=2)
    with pytest.raises(RuntimeError, match="inside"):
        with patched_with(model, stat_tokens=3, num_sink=1):
            assert (patch_options(model).stat_tokens, patch_options(model).num_sink) == (3, 1)
            raise RuntimeError("inside")
    assert (patch_options(model).stat_tokens, patch_options(model).num_sink) == (2, 0)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM is not patched: call fastprobe.patch\(model\) first"):
        patch_options(tiny_model("llama"))
    for patched in (True, False):
        with pytest.raises(TypeError, match="stat_token is not a patch option"):
            with patched_with(model, stat_token=3):
                pass
        fp.unpatch(model)
    assert not is_patched(model)
    fp.patch(model)
    with patched_with(model, stat_tokens=3):
        fp.unpatch(model)  # the block's own choice: nothing to restore afterwards
    assert not is_patched(model)


def test_options_changed_inside_a_temporary_patch_are_kept():
    """record_attention / patched_with on an unpatched model patch it for the block; a prune or a
    patch() inside the block (the model's options changed there) stays after it, rather than being
    dropped with the temporary patch (the handle still said active, the heads ran unpruned). Left
    unchanged, or changed and changed back, the model is unpatched as before."""
    from fastprobe.integrations import patched_with
    from fastprobe.methods import sinks

    ids, mask = inputs()
    for block in (lambda model: fp.record_attention(model), lambda model: patched_with(model, stat_tokens=2)):
        model = tiny_model("llama")
        with block(model):
            handle = sinks.prune_heads(model, [(0, 1)])
        assert handle.active and is_patched(model) and patch_options(model).head_mask[0].tolist() == [
            True, False, True, True]
        assert patch_options(model).stat_tokens == 1  # (patched_with's own change undone)
        handle.restore()  # (the block's patch, kept only for the prune, goes with it)
        assert not is_patched(model) and model.config._attn_implementation == "sdpa"
        with block(model):  # (restored inside the block: unpatched when the block ends)
            with sinks.prune_heads(model, [(0, 1)]):
                outputs(model, ids, mask)
            assert is_patched(model)
        assert not is_patched(model)
        with block(model):
            fp.patch(model, num_sink=2)
        assert is_patched(model) and patch_options(model).num_sink == 2
        fp.unpatch(model)
        with block(model):
            outputs(model, ids, mask)
        assert not is_patched(model)
        with block(model):  # (changed and changed back inside: equal options, new objects)
            with sinks.prune_heads(model, [(0, 1)]), patched_with(model, num_sink=2):
                outputs(model, ids, mask)
            integration.update_patch(model)
        assert not is_patched(model)


def test_a_head_mask_changed_inside_a_temporary_patch_is_kept():
    """patched_with(head_mask=...) on an unpatched model, and a prune of that layer inside the block:
    the head mask's values changed there (its layers did not), so the model stays patched with the
    prune after the block, as with any other option changed inside it."""
    from fastprobe.integrations import patched_with
    from fastprobe.methods import sinks

    model = tiny_model("llama")
    with patched_with(model, head_mask={0: torch.ones(4, dtype=torch.bool)}):
        handle = sinks.prune_heads(model, [(0, 1)])
    assert handle.active and is_patched(model)
    assert patch_options(model).head_mask[0].tolist() == [True, False, True, True]
    fp.unpatch(model)


@pytest.mark.parametrize("wrap", ["adapter", "compiled"])
def test_a_wrapped_model_is_patched_recorded_and_unpatched_through_its_wrapper(wrap):
    """A PEFT-style wrapper (attributes forwarded to the model inside) or torch.compile's: patch,
    record_attention, is_patched and unpatch act on the model inside and return the wrapper (a PEFT
    model was refused by patch, yet looked patched through its forwarding once its model was, and
    unpatch of it stripped the layers before failing: the model then ran unpatched, its head masks
    and records silently empty)."""
    from .transformers_helpers import AdapterWrapper

    reference, model = tiny_model("llama"), tiny_model("llama")
    wrapper = AdapterWrapper(model) if wrap == "adapter" else torch.compile(model, backend="eager")
    ids, mask = inputs()
    assert fp.patch(wrapper, head_mask={0: [True, False, True, True]}) is wrapper
    assert is_patched(model) and is_patched(wrapper) and patch_options(wrapper).head_mask[0][1].item() is False
    with fp.record_attention(wrapper) as record:
        outputs(wrapper, ids, mask)
    assert record.sink_mass[0, 1] == 0 and (record.sink_mass[0, [0, 2, 3]] > 0).all()
    assert fp.unpatch(wrapper) is wrapper and not is_patched(model) and not is_patched(wrapper)
    assert model.config._attn_implementation == "sdpa"
    with fp.record_attention(wrapper) as record:  # (patched for the block, inside)
        assert is_patched(model)
        assert_real_close(outputs(wrapper, ids, mask), outputs(reference, ids, mask), mask)
    assert not is_patched(model) and record.num_queries.tolist() == [mask.sum().item()] * 2


def test_only_peft_and_compile_wrappers_are_looked_into():
    """A module with a get_base_model of its own meaning (no peft_config; one taking an argument,
    one returning a non-module) is not a wrapper: patch refuses it by type, as before wrappers
    were read (it raised a TypeError about the missing argument)."""
    class Holder(torch.nn.Module):
        def get_base_model(self, variant):
            return tiny_model("llama")

    class Odd(torch.nn.Module):
        peft_config = {}

        def get_base_model(self):
            return "not a model"

    for holder in (Holder(), Odd()):
        assert _lookups.unwrapped(holder) is holder and not is_patched(holder)
        with pytest.raises(TypeError, match="takes a transformers PreTrainedModel"):
            fp.patch(holder)


def test_a_peft_model_is_patched_through_its_wrapper():
    """The same with a real PEFT LoRA model (its adapters on every projection, lora_B random so they
    matter): patched equals unpatched, pruned heads record 0, unpatch restores sdpa."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(tiny_model("llama"), config).eval()
    ids, mask = inputs()
    want = outputs(wrapped, ids, mask)
    fp.patch(wrapped)
    assert_real_close(outputs(wrapped, ids, mask), want, mask)
    from fastprobe.methods import sinks

    with sinks.prune_heads(wrapped, [(0, 1)]), fp.record_attention(wrapped) as record:
        outputs(wrapped, ids, mask)
    assert record.sink_mass[0, 1] == 0
    fp.unpatch(wrapped)
    assert not is_patched(wrapped) and wrapped.get_base_model().config._attn_implementation == "sdpa"


def test_recording_pruned_heads_reads_zero():
    model = fp.patch(tiny_model("llama"), head_mask={0: [True, False, True, True]})
    ids, mask = inputs()
    with fp.record_attention(model) as record:
        outputs(model, ids, mask)
    assert record.sink_mass[0, 1] == 0 and (record.sink_mass[0, [0, 2, 3]] > 0).all()


def test_a_model_sharing_the_patched_models_config_is_warned_about():
    """Two models made from one config object share it, so patching one switches the other to
    fastprobe's attention as well: its forward warns (it is often meant as the unpatched reference);
    the patched model's own forward does not, and unpatch ends it."""
    config = tiny_config("llama")
    reference = transformers.LlamaForCausalLM(config).eval()
    model = fp.patch(transformers.LlamaForCausalLM(config).eval())
    assert model.config is reference.config
    ids, mask = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs(model, ids, mask)
    with pytest.warns(UserWarning, match="shares its config object with a model that fastprobe.patch switched"):
        outputs(reference, ids, mask)
    fp.unpatch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs(reference, ids, mask)


def test_a_model_made_from_a_copy_of_the_patched_models_config_is_warned_about():
    """A copy of a patched model's config (copy.deepcopy, what the warning above suggested, made
    after patching; from_config copies too) names "fastprobe": a model made from it runs fastprobe's
    attention without options, recording or a backward, and said nothing (a training step then
    failed as forward-only). Its forward warns; a deep copy of the patched model (patched itself),
    whose LLaVA vision tower runs fastprobe's attention outside its layers, does not."""
    model = fp.patch(tiny_model("llama"))
    ids, mask = inputs()
    other = transformers.LlamaForCausalLM(copy.deepcopy(model.config)).eval()
    assert other.config._attn_implementation == "fastprobe" and not is_patched(other)
    with pytest.warns(UserWarning, match="belongs to no patched model"):
        outputs(other, ids, mask)
    if hasattr(other, "set_attn_implementation"):
        other.set_attn_implementation("sdpa")
    else:  # (transformers 4.53)
        other.config._attn_implementation = "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs(other, ids, mask)
    llava = fp.patch(transformers.LlavaForConditionalGeneration(small_llava_config()).eval())
    llava_ids, llava_mask = torch.randint(3, 290, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    llava_ids[:, 4:8] = 299
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for each in (llava, copy.deepcopy(llava)):
            outputs(each, llava_ids, llava_mask, pixel_values=torch.randn(2, 3, 28, 28))


def test_a_patched_model_deleted_without_unpatch_is_freed():
    """fastprobe keeps no strong reference to a patched model (nor to its attention modules)."""
    import gc
    import weakref

    model = fp.patch(tiny_model("llama"))
    layer = weakref.ref(attention_layers(model)[0])
    del model
    gc.collect()
    assert layer() is None


def test_a_patched_model_deleted_without_unpatch_frees_its_attention_without_the_cycle_collector():
    """Dropping the last reference to a patched model frees its attention modules (their weights)
    at once: the patch state each of them holds does not hold them back (a reference cycle kept
    them, a third of a Llama's weights, until the cyclic garbage collector happened to run)."""
    import gc
    import weakref

    model = fp.patch(tiny_model("llama"))
    outputs(model, *inputs())
    layer = weakref.ref(attention_layers(model)[0])
    weight = weakref.ref(attention_layers(model)[0].q_proj.weight)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del model
        assert layer() is None and weight() is None
    finally:
        if enabled:
            gc.enable()


def test_a_kept_record_holds_its_sums_not_the_blocks_key_group_views():
    """After its block an AttentionRecord keeps what its fields are read from, not the per-forward
    views of the key groups ([B, Lk] each, up to 8 of them: ~850 times the sums' bytes after a
    generate of batch 8 over 512 tokens)."""
    model = fp.patch(tiny_model("llama"))
    ids, mask = inputs()
    with fp.record_attention(model, key_groups=torch.zeros_like(ids)) as record:
        outputs(model, ids, mask)
    assert not record._views and not record._ones
    assert torch.isfinite(record.sink_mass).all() and torch.isfinite(record.group_mass).all()


def test_two_patched_models_sharing_a_config_do_not_warn():
    """Two LLaVAs made from one config, both patched: the vision tower of either (plain fastprobe
    attention, not one of its patched layers) belongs to a patched model, so neither warns."""
    config = small_llava_config()
    first = fp.patch(transformers.LlavaForConditionalGeneration(config).eval())
    second = fp.patch(transformers.LlavaForConditionalGeneration(config).eval())
    ids, mask = torch.randint(3, 290, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    ids[:, 4:8] = 299
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model in (first, second):
            outputs(model, ids, mask, pixel_values=torch.randn(2, 3, 28, 28))
    fp.unpatch(second)
    fp.unpatch(first)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vision_language_models_with_images(family):
    """Qwen2-VL and Qwen2.5-VL (multimodal rotary positions, image tokens merged 2 x 2): with an
    image in each prompt, the patched model gives the unpatched logits and greedy tokens, records
    statistics, and guidance with gamma = 0 changes nothing."""
    names = {"qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
             "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}[family]
    if not all(hasattr(transformers, name) for name in names):
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, pad_token_id=0)
    vision = dict(depth=1, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  **({"embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2} if family == "qwen2_vl" else
                     {"hidden_size": 32, "out_hidden_size": 64, "intermediate_size": 64}))
    models = []
    for _ in range(2):
        config = getattr(transformers, names[0])(text_config=text, vision_config=vision, image_token_id=299,
                                                 video_token_id=298, vision_start_token_id=297, vision_end_token_id=296)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            models.append(getattr(transformers, names[1])(config).eval())
    check_qwen_vision_language_model(models[0], patch_or_skip(models[1]))


def check_qwen_vision_language_model(reference, model, frames_per_patch=2):
    """A patched Qwen-VL-style model (image token 299 between 297 and 296, 14-pixel patches of
    frames_per_patch frames merged 2 x 2, 4 heads) against its unpatched twin, with an image in each of two prompts (one
    left-padded): the same logits and greedy tokens, statistics recorded for every attention
    layer, and guidance with gamma = 0 changing nothing."""
    ids = torch.randint(3, 290, (2, 14))
    ids[:, 3], ids[:, 4:8], ids[:, 8] = 297, 299, 296  # vision start, 4 merged image tokens (4 x 4 patches), end
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    images = dict(pixel_values=torch.randn(32, 3 * frames_per_patch * 14 * 14),
                  image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]))
    if "mm_token_type_ids" in inspect.signature(reference.forward).parameters:  # (5.x: the processor's)
        images["mm_token_type_ids"] = (ids == 299).long()
    assert_real_close(outputs(model, ids, mask, **images), outputs(reference, ids, mask, **images), mask)
    with torch.no_grad():
        settings = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, **images)
        want = reference.generate(ids, **settings)
        assert torch.equal(model.generate(ids, **settings), want)
        with fp.record_attention(model) as record:
            model(input_ids=ids, attention_mask=mask, **images)
        assert record.sink_mass.shape == (len(attention_layers(model)), 4) and bool((record.sink_mass > 0).all())
        fp.patch(model, guidance=dict(gamma=0.0))
        assert torch.equal(model.generate(ids, **settings), want)


def test_packed_images_of_a_vision_tower_attend_within_themselves():
    """cu_seq_lens on a module patch did not list (a vision tower): each packed sequence attends
    only within itself, the 4D mask, if given, must be their block diagonal; anything else is
    refused. A patched layer takes them too (causal within each sequence, as flash attention)."""
    module = torch.nn.Module()
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    bounds = torch.tensor([0, 4, 9], dtype=torch.int32)
    packed = dict(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=5, max_length_k=5)
    ids = torch.tensor([0] * 4 + [1] * 5)
    block = torch.where(ids[:, None] == ids[None, :], 0.0, torch.finfo(torch.float32).min)[None, None]
    got, _ = _attention.attention_forward(module, q, k, v, block, scaling=0.3, is_causal=False, **packed)
    want = torch.cat([fp.reference.sink_attention(q[:, :, s:e].double(), k[:, :, s:e].double(), v[:, :, s:e].double(),
                                                  scale=0.3, causal=False)["out"] for s, e in ((0, 4), (4, 9))], dim=2)
    torch.testing.assert_close(got.transpose(1, 2).double(), want, **TOLERANCE)
    with pytest.raises(NotImplementedError, match="not their block diagonal"):
        _attention.attention_forward(module, q, k, v, torch.zeros_like(block), scaling=0.3, is_causal=False, **packed)
    with pytest.raises(NotImplementedError, match="boundaries agree"):
        _attention.attention_forward(module, q, k, v, None, scaling=0.3, is_causal=False,
                                      **dict(packed, cu_seq_lens_k=torch.tensor([0, 5, 9], dtype=torch.int32)))
    model = fp.patch(tiny_model("llama"))
    layer = attention_layers(model)[0]
    got, _ = _attention.attention_forward(layer, q, k, v, None, scaling=0.3, **packed)
    want = torch.cat([fp.reference.sink_attention(q[:, :, s:e].double(), k[:, :, s:e].double(), v[:, :, s:e].double(),
                                                  scale=0.3, causal=True)["out"] for s, e in ((0, 4), (4, 9))], dim=2)
    torch.testing.assert_close(got.transpose(1, 2).double(), want, **TOLERANCE)
    with pytest.raises(NotImplementedError, match="cu_seq_lens.*2D mask"):  # unlisted: a 4D mask or none
        _attention.attention_forward(module, q, k, v, torch.ones(1, 9, dtype=torch.bool), scaling=0.3, **packed)
