"""fastprobe inside other libraries. transformers: `patch`, `unpatch`, `update_patch`, `patched_with`,
`record_attention` (transformers itself is imported only when one of them is called)."""

from .transformers import (
    AttentionRecord, PatchOptions, attention_layers, is_patched, patch, patch_options, patched_with, record_attention,
    unpatch, update_patch,
)

__all__ = [
    "AttentionRecord", "PatchOptions", "attention_layers", "is_patched", "patch", "patch_options", "patched_with",
    "record_attention", "unpatch", "update_patch",
]
