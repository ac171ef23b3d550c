"""fastprobe: fused GPU (Triton) and CPU (C++) kernels for looking inside language models.

    import fastprobe as fp
    fp.draft_divergence(draft_logits, target_logits)   # token-level epistemic uncertainty
    fp.draft_divergence_sharded(draft_shard, target_shard)   # the same, vocabulary sharded over ranks
    fp.concept_mass(logits, fp.ConceptSet.from_answers(tokenizer, {"Paris": ["Paris"]}))
    fp.sink_attention(q, k, v, window=4096, num_sink=4).sink_mass   # attention statistics, fused
    fp.set_backend("auto" | "reference" | "cpp" | "triton")
    fp.patch(model); with fp.record_attention(model) as r: model(**batch)   # transformers models
"""

from . import reference
from .backend import get_backend, set_backend, use_backend
from .integrations import AttentionRecord, PatchOptions, patch, record_attention, unpatch
from .ops.attention import AttentionOutput, sink_attention
from .ops.dual_attention import dual_path_attention
from .ops.bridge import BridgeLoss, FusedLinearBridgeLoss, beta_schedule, bridge_loss
from .ops.concepts import ConceptMass, ConceptSet, concept_mass
from .ops.divergence import DraftDivergence, draft_divergence, draft_divergence_sharded

__version__ = "0.1.0"

__all__ = [
    "AttentionOutput",
    "AttentionRecord",
    "PatchOptions",
    "BridgeLoss",
    "FusedLinearBridgeLoss",
    "beta_schedule",
    "bridge_loss",
    "ConceptMass",
    "ConceptSet",
    "DraftDivergence",
    "concept_mass",
    "draft_divergence",
    "draft_divergence_sharded",
    "dual_path_attention",
    "get_backend",
    "patch",
    "record_attention",
    "reference",
    "set_backend",
    "sink_attention",
    "unpatch",
    "use_backend",
]
