"""Small built-in transformers models and a tokenizer, made in-process (no downloads).

Shared by `fastprobe demo`, the tests and the benchmarks. The models are built from small
configs with a fixed seed: their weights are random, so what they compute is meaningless as
language, but every code path of a real checkpoint of that architecture runs.

    tokenizer = tiny_tokenizer()                    # byte-level BPE trained on DEMO_TEXTS
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model = tiny_model("gemma2", num_layers=3, sliding_window=4)
    plant_sink_heads(model, {0: [1], 2: [0, 3]})   # known BOS sink heads, for the sinks pipeline
    processor = tiny_llava_processor()              # tokenizer with <image> + a PIL image processor
    vlm = tiny_llava(processor)                     # CLIP vision tower + Llama text model (LLaVA)
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "ARCHITECTURES", "DEMO_TEXTS", "IMAGE_TOKEN", "plant_sink_heads", "tiny_config", "tiny_llava",
    "tiny_llava_processor", "tiny_model", "tiny_tokenizer",
]

IMAGE_TOKEN = "<image>"  # the tiny LLaVA's image placeholder (a special token of its tokenizer)

# Causal language models, then the bidirectional encoder.
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "llama4", "gpt2", "bert")

DEMO_TEXTS = [
    "The river ran past the old mill and under the stone bridge before it reached the sea.",
    "A small model can still show where attention goes when it reads a sentence.",
    "Heads that look only at the first token are called sink heads.",
    "She opened the window, and the cold morning air filled the quiet room.",
    "Prices rose in the spring, fell over the summer and settled by the autumn.",
    "The library kept its rarest maps in a locked drawer under the reading desk.",
    "Every language model spends some of its attention on tokens that carry little meaning.",
    "He counted the boats in the harbour: seven red, four white and one without a name.",
    "Pruning a head removes its output from the sum that the next layer reads.",
    "The recipe asks for two eggs, a cup of flour and a pinch of salt.",
    "When the train stopped, the passengers looked up from their books and phones.",
    "A sliding window keeps only the most recent tokens visible to each query.",
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "Stars appear to move across the sky because the earth turns on its axis.",
    "The museum reopened after the repairs with a new wing for modern art.",
    "Perplexity measures how surprised a model is by the text it is given.",
]


def tiny_tokenizer(vocab_size: int = 512, padding_side: str = "right", texts=None):
    """A byte-level BPE tokenizer trained in-process on `texts` (default DEMO_TEXTS), as a
    transformers PreTrainedTokenizerFast with <s> (prepended to every text), </s> and <pad>."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts or DEMO_TEXTS), trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side=padding_side,
        model_input_names=["input_ids", "attention_mask"],  # 4.5x's default adds token_type_ids, which generate refuses
    )


def tiny_config(arch: str = "llama", *, vocab_size: int = 512, num_layers: int = 2, hidden_size: int = 64,
                num_heads: int = 4, num_kv_heads: int | None = None, **overrides: Any):
    """A small transformers config of architecture `arch` (one of ARCHITECTURES); head_dim =
    hidden_size / num_heads, grouped-query (num_kv_heads = num_heads / 2) where the architecture
    has it, float32, no dropout. Gemma 2/3 and Mistral get a sliding window of 4 tokens and Qwen2
    one on its second layer, Llama 4 chunked attention in chunks of 4 on every layer but the last
    (and mixture-of-experts MLPs on odd layers), so short test inputs cross them; overrides win."""
    import transformers

    head_dim = hidden_size // num_heads
    kv_heads = num_kv_heads if num_kv_heads is not None else max(num_heads // 2, 1)
    decoder = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                   num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=kv_heads,
                   max_position_embeddings=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    gemma = dict(head_dim=head_dim, sliding_window=4, query_pre_attn_scalar=head_dim)
    settings = {
        "llama": ("LlamaConfig", decoder),
        "qwen2": ("Qwen2Config", dict(decoder, use_sliding_window=True, sliding_window=4,
                                      max_window_layers=min(1, num_layers - 1))),
        "qwen3": ("Qwen3Config", dict(decoder, head_dim=head_dim)),
        "mistral": ("MistralConfig", dict(decoder, head_dim=head_dim, sliding_window=4)),
        "gemma2": ("Gemma2Config", dict(decoder, **gemma)),
        "gemma3": ("Gemma3TextConfig", dict(decoder, **gemma, layer_types=[
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)])),
        "llama4": ("Llama4TextConfig", dict(
            decoder, head_dim=head_dim, intermediate_size_mlp=2 * hidden_size, num_local_experts=2,
            num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=4,
            no_rope_layers=[int(i < num_layers - 1) for i in range(num_layers)])),  # 1: rotary, chunked
        "gpt2": ("GPT2Config", dict(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                                    n_positions=8192, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=0)),
        "bert": ("BertConfig", dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                    num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                    max_position_embeddings=8192, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, pad_token_id=0)),
    }
    if arch not in settings:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    name, kwargs = settings[arch]
    return getattr(transformers, name)(**{**kwargs, **overrides})


def tiny_model(arch: str = "llama", *, seed: int = 0, attn_implementation: str | None = None,
               dtype: torch.dtype = torch.float32, **config_options: Any):
    """A randomly initialised model from tiny_config(arch, **config_options), with weights drawn
    after torch.manual_seed(seed) (the global RNG state is restored afterwards), in eval mode.
    Causal architectures get their ...ForCausalLM class, BERT its BertModel."""
    import transformers

    config = tiny_config(arch, **config_options)
    auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, **kwargs)
    return model.to(dtype).eval()


def plant_sink_heads(model, heads, *, bos_token_id: int | None = None, strength: float = 3.0):
    """Makes the chosen heads of a tiny Llama-family model (q_proj / k_proj, rotary positions)
    attend almost only to the BOS token; returns the model. heads: {layer: [head, ...]}.

    Every token embedding gets a shared component on hidden dimension 0 and only BOS one on
    dimension 1 (the residual stream carries both through a few random layers). A planted head's
    query reads dimension 0 and its key dimension 1, both on the rotary pair that turns slowest,
    so q.k is about strength^2 * |x_0| |x_1| (tens of nats) for BOS and 0 for every other key,
    at any distance. The key row is shared by the query heads of one key/value group; the others
    in the group keep their random queries (a small push towards BOS).

    Needs Llama-style attention (q_proj, k_proj, head_dim, num_key_value_groups) without
    per-head query/key norms (Qwen 3's and Gemma 3's q_norm / k_norm, Llama 4's qk_norm on its
    rotary layers, rescale the planted rows to a weak push): other attention, or a layer or head
    out of range, is a ValueError, raised before any weight changes. Where a layer has a sliding
    window or chunks (Mistral, Gemma 2), BOS is out of sight of later queries, so a head planted
    there is a sink only near BOS."""
    from .integrations.transformers import attention_layers

    bos = model.config.bos_token_id if bos_token_id is None else bos_token_id
    embedding = model.get_input_embeddings().weight
    try:
        layers = attention_layers(model)
    except NotImplementedError as error:  # (attention fastprobe cannot reach: GPT-2 on transformers 4.53)
        raise ValueError(f"plant_sink_heads needs Llama-style attention that fastprobe can patch: {error}") from error
    for layer, chosen in heads.items():
        if not (isinstance(layer, int) and 0 <= layer < len(layers)):
            raise ValueError(f"heads: layer {layer!r} is not a layer index in [0, {len(layers)})")
        attention = layers[layer]
        if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "head_dim", "num_key_value_groups")):
            raise ValueError(f"plant_sink_heads needs Llama-style attention (q_proj, k_proj, head_dim, "
                             f"num_key_value_groups); layer {layer} is a {type(attention).__name__}")
        if any(getattr(attention, name, None) is not None for name in ("q_norm", "k_norm", "qk_norm")):
            raise ValueError(f"plant_sink_heads: layer {layer} ({type(attention).__name__}) normalises each head's "
                             "queries and keys (q_norm / k_norm / qk_norm), which would undo the planted rows")
        num_heads = attention.q_proj.out_features // attention.head_dim
        for head in chosen:
            if not (isinstance(head, int) and 0 <= head < num_heads):
                raise ValueError(f"heads: head {head!r} of layer {layer} is not a head index in [0, {num_heads})")
    with torch.no_grad():
        embedding[:, 0] = 0.3
        embedding[:, 1] = 0.0
        embedding[bos, 1] = 0.3
        for layer, chosen in heads.items():
            attention = layers[layer]
            size, group = attention.head_dim, attention.num_key_value_groups
            slow = size // 2 - 1  # rotate_half pairs (i, i + size/2); the last pair has the lowest frequency
            for head in chosen:
                query = attention.q_proj.weight[head * size:(head + 1) * size]
                query.zero_()
                query[slow, 0] = strength
                key_row = attention.k_proj.weight[(head // group) * size + slow]
                key_row.zero_()
                key_row[1] = strength
    return model


def tiny_llava_processor(image_size: int = 28, patch_size: int = 14, vocab_size: int = 512, padding_side: str = "left"):
    """A transformers LlavaProcessor made in-process: tiny_tokenizer with IMAGE_TOKEN added as a
    special token (id vocab_size, after the BPE vocabulary), and a PIL image processor that resizes
    any image to image_size x image_size with CLIP's normalisation (no torchvision needed). Each
    IMAGE_TOKEN in a prompt becomes (image_size / patch_size)^2 image tokens. Left padding, as
    batched generation wants."""
    import transformers

    tokenizer = tiny_tokenizer(vocab_size=vocab_size, padding_side=padding_side)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    square = {"height": image_size, "width": image_size}
    images = _llava_pil_image_processor()(size=square, crop_size=square, do_center_crop=False)
    return transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch_size,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       image_token=IMAGE_TOKEN)


def _llava_pil_image_processor():
    """LLaVA's image processor class that works on PIL and numpy (no torchvision)."""
    try:
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    except ImportError:  # transformers 4.5x and early 5.x: the slow processor is the PIL one
        from transformers.models.llava.image_processing_llava import LlavaImageProcessor as LlavaImageProcessorPil
    return LlavaImageProcessorPil


def tiny_llava(processor=None, *, seed: int = 0, num_layers: int = 2, hidden_size: int = 64, num_heads: int = 4,
               num_kv_heads: int | None = None, vision_hidden_size: int = 32, vision_layers: int = 1,
               image_size: int = 28, patch_size: int = 14, dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None):
    """A randomly initialised LlavaForConditionalGeneration (CLIP vision tower, two-layer projector,
    Llama text model from tiny_config("llama")) matching `processor` (default:
    tiny_llava_processor(image_size, patch_size)): the text vocabulary is the processor's and the
    image token id is its IMAGE_TOKEN. Weights drawn after torch.manual_seed(seed) (the global RNG
    state is restored), eval mode. Vision features: every patch of the last layer, CLS dropped."""
    import transformers

    if processor is None:
        processor = tiny_llava_processor(image_size=image_size, patch_size=patch_size)
    tokenizer = processor.tokenizer
    vision = transformers.CLIPVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, num_hidden_layers=vision_layers,
        num_attention_heads=max(vision_hidden_size // 16, 1), image_size=image_size, patch_size=patch_size,
        attention_dropout=0.0,
    )
    text = tiny_config("llama", vocab_size=len(tokenizer), num_layers=num_layers, hidden_size=hidden_size,
                       num_heads=num_heads, num_kv_heads=num_kv_heads, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = transformers.LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=processor.image_token_id,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
    )
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlavaForConditionalGeneration._from_config(config, **kwargs)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(dtype).eval()
