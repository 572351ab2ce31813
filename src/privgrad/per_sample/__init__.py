"""Per-sample gradient machinery: capture of layer inputs/output-gradients and layer rules."""

from privgrad.per_sample.registry import RULES, lookup
from privgrad.per_sample.rule import Formula, LayerRule

__all__ = ["RULES", "Formula", "LayerRule", "lookup"]
