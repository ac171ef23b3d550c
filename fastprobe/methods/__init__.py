"""The method layer: what people do with the fused operations on transformers models."""
