"""fastprobe inside other libraries. transformers: `patch`, `unpatch`, `record_attention`
(transformers itself is imported only when one of them is called)."""

from .transformers import (
    AttentionRecord, PatchOptions, attention_layers, is_patched, patch, patch_options, record_attention, unpatch,
)

__all__ = [
    "AttentionRecord", "PatchOptions", "attention_layers", "is_patched", "patch", "patch_options",
    "record_attention", "unpatch",
]
