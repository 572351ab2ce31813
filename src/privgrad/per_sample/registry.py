"""The explicit table of per-layer rules, keyed by module type.

Every rule privgrad knows is listed here and nowhere else; a module whose exact type is
not a key (nor, for optional libraries' classes, a name in ``NAMED_RULES``) goes to the
``torch.func`` path (``per_sample.functional``). The table is
built once from the rule files and never changes: nothing registers rules at run time,
so two models in one process can never see different mathematics for the same layer.
"""

from __future__ import annotations

from types import MappingProxyType

from torch import nn

from privgrad.per_sample.rule import LayerRule
from privgrad.per_sample.rules import conv, embedding, linear, normalization

RULES = MappingProxyType({
    rule.module_type: rule
    for rule in (*linear.RULES, *conv.RULES, *embedding.RULES, *normalization.RULES)
})
"""``{module type: LayerRule}`` (exact types: a subclass may change the forward)."""

NAMED_RULES = MappingProxyType({**linear.NAMED_RULES, **normalization.NAMED_RULES})
"""``{"module.qualname": LayerRule}``: classes of optional libraries (Hugging Face's
``Conv1D`` and RMSNorms), matched by their exact name so that the library is never
imported by privgrad."""


def lookup(module: nn.Module) -> LayerRule | None:
    """Returns the rule for ``type(module)``, or ``None`` if there is none."""
    t = type(module)
    return RULES.get(t) or NAMED_RULES.get(f"{t.__module__}.{t.__qualname__}")
