"""Per-sample gradient machinery: capture of layer inputs/output-gradients and layer rules."""

from privgrad.per_sample.registry import LayerRule, lookup, register

__all__ = ["LayerRule", "lookup", "register"]
