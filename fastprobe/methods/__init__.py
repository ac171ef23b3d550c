"""The method layer: what people do with the fused operations on transformers models.

    sinks          score heads by their attention on the first token, prune them, perplexity
    guidance       contrastive guidance for LLaVA-style models (dual-path attention), two-pass baseline
    distillation   logit-bridge distillation in a training loop or the transformers Trainer
    uncertainty    per-token draft-model uncertainty of texts and generations, sequence scores, AUROC
    availability   the gold answer's probability mass at the commitment step, over its surface forms
    soft_prompts   random soft prompts drawn from the embedding table's Gaussian, for generate
    nullspace      a modality's shift subspace, projected out of a layer's hidden state
    probes         hidden states at chosen layers, and linear / MLP / attentive probes on them

Import the one you need: `from fastprobe.methods import uncertainty`.

Functions that read texts truncate each to max_length tokens. max_length=None (the default)
is the checkpoint's context: the fewest positions the configs of the models that read the
texts give, less the tokens that follow a text into them (the generated ones); without such a
config, the tokenizer's model_max_length where it is set, else 512. The fastprobe command's
--max-length defaults to the same.
"""
