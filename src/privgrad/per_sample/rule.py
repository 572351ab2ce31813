"""What a per-layer rule is: its exact formulas, and what each one costs.

A rule turns one recorded call of a layer — its input ``A`` and the gradient of the
summed loss with respect to its output ``G`` — into per-sample quantities. Rules are
pure functions of ``(module, A, G)``; nothing is stored on the module or on tensors.
Where a quantity has several exact formulas (a ghost norm, or the norm of a
materialised gradient), the rule lists them with their cost computed from the shapes,
and ``per_sample.policy`` picks one: every formula gives the same value up to
floating-point rounding, so the choice changes speed only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

PerSampleGradsFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""``(module, A, G) -> {param attribute: (B, *param.shape)}``."""


@dataclass(frozen=True)
class Formula:
    """One exact way to compute a ``(B,)`` per-sample quantity, with its cost.

    Attributes:
        run: Maps a slice of sample indices to that chunk's values, ``(b,)``.
        flops: Multiply-adds per sample.
        memory: Elements of the largest intermediate per sample (the chunk size follows
            from it, ``chunks.per_sample_chunked``).
        ghost: ``True`` if it never forms a per-sample gradient (a ghost norm).
    """

    run: Callable[[slice], torch.Tensor]
    flops: int
    memory: int
    ghost: bool


NormFormulasFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, dict[str, Formula]]]
"""``(module, A, G) -> {param attribute: {formula name: Formula}}``: the exact formulas of
each trainable parameter's squared per-sample norms, cheapest-to-state first (a tie in
cost goes to the first listed)."""

FLOAT64_COST = 2
"""How many float32 multiply-adds a float64 one is counted as in ``Formula.flops`` and
``Formula.memory`` (a CPU's vector units do half as many)."""

MassesFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, Formula]]
"""``(module, A, G) -> {param attribute: Formula}``: each trainable parameter's per-sample
*mass*, an upper bound on the per-sample gradient's norm computed without cancellation
(``Σ_t ‖a_t‖·‖g_t‖`` for a weight ``Σ_t g_t a_tᵀ``), float64 ``(b,)``. Book-keeping needs it:
``per_sample.ghost.squared_norms`` explains why."""

ClippedSumFn = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]
]
"""``(module, A, G, {attr: factors (B,)}) -> {attr: param.shape}``: sum_i f_i g_i, each a
fresh tensor in ``chunks.accumulation_dtype`` of the call."""


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
            so that subclasses with a different forward fall back to the generic path);
            ``nn.Module`` itself for a rule matched by class name
            (``registry.NAMED_RULES``).
        per_sample_grads: Materialises per-sample gradients.
        norm_formulas: Optional: the exact formulas of the squared per-sample norms,
            with their costs (book-keeping needs it and ``clipped_sum``).
        clipped_sum: Optional clipped sum without materialisation.
        masses: Optional per-sample masses of the parameters (``MassesFn``); a call is
            book-kept only when its rule has all three.
        param_names: The parameters the formulas differentiate. A module of this type
            that trains any other parameter of its own (``weight_g``/``weight_v`` of
            ``torch.nn.utils.weight_norm``, whose hook computes ``weight`` from them) is
            not this layer as the formulas know it: it goes to the functional path.
    """

    module_type: type[nn.Module]
    per_sample_grads: PerSampleGradsFn
    norm_formulas: NormFormulasFn | None = None
    clipped_sum: ClippedSumFn | None = None
    masses: MassesFn | None = None
    param_names: tuple[str, ...] = ("weight", "bias")
