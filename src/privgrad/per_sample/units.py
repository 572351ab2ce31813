"""Which module computes the per-sample gradients of which parameters.

A *unit* is a module whose forward calls are recorded. A module with a registered rule
(and trainable parameters of its own, all of them ones the rule differentiates) is a rule
unit. Any other module holding trainable
parameters directly is a *functional* unit: it claims every trainable parameter of its
whole subtree, and its per-sample gradients come from re-running its forward with
``torch.func`` (so parameters a module uses outside its children's forward, like
``MultiheadAttention.out_proj``, are never missed). A module inside a claimed subtree is
still a unit of its own: its calls made inside the claiming parent's forward are skipped
by the capture (the parent's re-run covers them), but a direct call elsewhere in the
model's forward is recorded. In mode ``"vmap"`` every unit is functional.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from privgrad.per_sample.registry import LayerRule, lookup


@dataclass(frozen=True)
class Unit:
    """One recorded module.

    Attributes:
        path: Module path in ``model.named_modules()`` (``""`` for the root).
        module: The module.
        rule: Its layer rule, or ``None`` for the functional (vmap) path.
        params: Claimed trainable parameters, keyed by name relative to ``module``.
    """

    path: str
    module: nn.Module
    rule: LayerRule | None
    params: dict[str, nn.Parameter]


def _trainable(module: nn.Module, recurse: bool) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=recurse) if p.requires_grad}


def plan_units(model: nn.Module, use_rules: bool = True) -> list[Unit]:
    """Assigns every trainable parameter of ``model`` to the unit(s) that record it.

    Args:
        model: The model.
        use_rules: ``False`` sends every unit through the functional path (mode ``"vmap"``).

    Returns:
        Units in ``named_modules`` order. A parameter shared by several modules (tied
        weights) is claimed by each of them; their contributions are summed.
    """
    units: list[Unit] = []
    for path, module in model.named_modules(remove_duplicate=False):
        own = _trainable(module, recurse=False)
        if not own:
            continue
        rule = lookup(module) if use_rules else None
        if rule is not None and set(own) <= set(rule.param_names):
            units.append(Unit(path, module, rule, own))
        else:
            units.append(Unit(path, module, None, _trainable(module, recurse=True)))
    return _dedupe(units)


def _dedupe(units: list[Unit]) -> list[Unit]:
    """A module reachable under two paths is recorded once (under its first path)."""
    seen: set[int] = set()
    out = []
    for u in units:
        if id(u.module) not in seen:
            seen.add(id(u.module))
            out.append(u)
    return out
