"""Registry of per-layer rules, keyed by module type.

A rule turns one recorded call of a layer — its input ``A`` and the gradient of the
summed loss with respect to its output ``G`` — into per-sample quantities. Rules are
pure functions of ``(module, A, G)``; nothing is stored on the module or on tensors.

Registering the same module type twice raises: a silent override would change the
mathematics of every model using that layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

PerSampleGradsFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""``(module, A, G) -> {param attribute: (B, *param.shape)}``."""

SquaredNormsFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, str], dict[str, torch.Tensor]]
"""``(module, A, G, strategy) -> {param attribute: (B,)}`` squared per-sample norms,
computed without materialising per-sample gradients where that is cheaper (ghost norms).
``strategy`` is ``"cost"`` (pick the formula by the performance model), ``"measure"``
(time the formulas once per layer shape, keep the fastest) or ``"ghost"`` (always the
ghost formula where the layer has one; used by tests)."""

ClippedSumFn = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]
]
"""``(module, A, G, {attr: factors (B,)}) -> {attr: param.shape}``: sum_i f_i g_i.

Each returned tensor must be fresh (no view of ``A``, ``G`` or another tensor) and the
same bits for the same inputs: the engine writes the private gradient into it, and the
trace computes it again when asked (``physical.clipped_sum_again``)."""


def trainable(param: torch.Tensor | None) -> bool:
    """Whether a rule should compute this parameter's per-sample quantities.

    Rules skip frozen parameters (and absent ones, e.g. ``bias=False``): a frozen weight's
    per-sample gradients would be as large as a trainable one's and thrown away.
    """
    return param is not None and param.requires_grad


@dataclass(frozen=True)
class LayerRule:
    """How per-sample quantities of one layer family are computed.

    Attributes:
        module_type: The ``nn.Module`` subclass the rule applies to (exact type match,
            so that subclasses with a different forward fall back to the generic path).
        per_sample_grads: Materialises per-sample gradients.
        squared_norms: Optional cheaper per-sample squared norms (ghost norms).
        clipped_sum: Optional clipped sum without materialisation.
        param_names: The parameters the formulas differentiate. A module of this type
            that trains any other parameter of its own (``weight_g``/``weight_v`` of
            ``torch.nn.utils.weight_norm``, whose hook computes ``weight`` from them) is
            not this layer as the formulas know it: it goes to the functional path.
    """

    module_type: type[nn.Module]
    per_sample_grads: PerSampleGradsFn
    squared_norms: SquaredNormsFn | None = None
    clipped_sum: ClippedSumFn | None = None
    param_names: tuple[str, ...] = ("weight", "bias")


_RULES: dict[type[nn.Module], LayerRule] = {}


def register(rule: LayerRule) -> LayerRule:
    """Adds a rule to the registry.

    Args:
        rule: The rule to add.

    Returns:
        The same rule, so this can be used at module level.

    Raises:
        ValueError: If a rule for the same module type is already registered.
    """
    if rule.module_type in _RULES:
        raise ValueError(
            f"privgrad: a per-sample rule for {rule.module_type.__name__} is already "
            "registered. Rules are not silently overridden; register a rule for a "
            "subclass instead."
        )
    _RULES[rule.module_type] = rule
    return rule


def lookup(module: nn.Module) -> LayerRule | None:
    """Returns the rule for ``type(module)``, or ``None`` if there is none."""
    _load_builtin_rules()
    return _RULES.get(type(module))


_LOADED = False


def _load_builtin_rules() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from privgrad.per_sample import conv, embedding, linear, normalization  # noqa: F401
