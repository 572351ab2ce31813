"""Which exact formula computes a layer's per-sample norms: the cost model, no timing.

``DESIGN.md``'s performance model: a ghost norm ``⟨AAᵀ, GGᵀ⟩`` costs about ``T²(d+p)``
multiply-adds per sample, a materialised gradient ``T·d·p``, a convolution's Gram-matrix
norm fewer than either on small images with many channels. Each rule states the cost
of each of its formulas from the shapes (``rule.Formula``); the policy takes the fewest
multiply-adds (a tie goes to the formula the rule lists first). The choice is a function
of the shapes alone: the same in every run, every process and every engine.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from privgrad.per_sample import chunks
from privgrad.per_sample.rule import Formula


def choose(formulas: Mapping[str, Formula]) -> str:
    """The name of the formula to run (see the module doc).

    Args:
        formulas: ``{name: Formula}`` as a rule lists them.
    """
    return min(formulas, key=lambda n: formulas[n].flops)  # min keeps the first of equals


def run(formula: Formula, batch_size: int, device: torch.device) -> torch.Tensor:
    """``(B,)``: the formula over the batch, in chunks that bound its intermediates."""
    return chunks.per_sample_chunked(formula.run, batch_size, formula.memory, device)


def squared_norms(
    formulas: Mapping[str, Mapping[str, Formula]],
    batch_size: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """``{attr: (B,)}``: each parameter's squared norms by its chosen formula."""
    return {a: run(fs[choose(fs)], batch_size, device) for a, fs in formulas.items()}
