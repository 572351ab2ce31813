"""Which axis of each recorded output is the batch: verified from the losses, not assumed.

A rule (Linear, Embedding, ...) reads sample ``i`` as row ``i`` of its input ``A`` and of
its output gradient ``G``; the functional fallback reads it along the axis its probe found.
Shapes cannot confirm either. A sequence-first ``(T, B, d)`` input with ``T == B``, or an
input shared by all samples (``torch.arange(T)`` with ``T == B``), has ``B`` rows too, and
the "per-sample" gradients computed from those rows belong to time steps or positions:
each mixes every sample, so clipping them bounds no sample's contribution.

The test checks the one property the per-sample formulas rest on. If loss ``i`` depends on
an output only through its slice ``i`` along axis ``d``, the gradient of ``Σ_i w_i·loss_i``
at that output is ``w ⊙_d G`` for every weight vector ``w``. So privgrad runs one more
backward pass to the recorded outputs with distinct power-of-two weights ``w`` (exact
under rounding: ``sample_weights``) and keeps, per output, the axes where the two agree
(``valid_dims``). A rule call whose axis 0 is not among them is
refused (``check_rule_call``); the functional fallback refuses an axis outside them.

Cost: one input-gradient backward pass on a step that checks. ``Verified`` remembers the
checked layouts (per module path, and which axes of the call's tensors have size ``B``), so
an engine pays it once per layout, not per step; ``clipped_batch_gradients`` checks every
call. Calls with one sample are never checked: one sample's gradient is the whole gradient.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch.utils._pytree import tree_flatten

from privgrad.errors import UnsupportedModelError
from privgrad.per_sample.chunks import HALF

Dims = tuple[frozenset[int] | None, ...]
"""Per output leaf of a call: the axes along which it is per-sample (``None``: no gradient)."""

class Verified:
    """The layouts one engine has checked: ``{layout key: valid axes per output leaf}``.

    Owned by the engine that checks (never shared between engines, never global): a key
    is a module path and the pattern of which axes of its inputs and outputs have size
    ``B``, so a batch whose size or sequence length makes a new axis coincide with ``B``
    is checked again.
    """

    def __init__(self) -> None:
        self._dims: dict[Hashable, Dims] = {}

    def get(self, key: Hashable) -> Dims | None:
        """The valid axes recorded for ``key``, or ``None`` if it was never checked."""
        return self._dims.get(key)

    def add(self, key: Hashable, dims: Dims) -> None:
        """Records the valid axes of a checked layout."""
        self._dims[key] = dims


def _pattern(shape: Sequence[int] | None, B: int) -> tuple[bool, ...] | None:
    return None if shape is None else tuple(s == B for s in shape)


_SCALARS = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device)
_CONTAINERS = (tuple, list, dict)


def _input_patterns(tree: object, B: int, out: list) -> None:
    """Appends the size-``B`` pattern of every tensor in ``tree``, ``None`` per other leaf.

    Called on every recorded call of every step, so it walks plain tuples, lists and dicts
    itself (``tree_flatten`` is slow enough to show on deep narrow models: docs/performance.md).
    Anything else goes to ``tree_flatten``, so no tensor a pytree node holds is missed;
    descending into a tuple subclass that pytree leaves whole only distinguishes more.
    """
    if isinstance(tree, torch.Tensor):
        out.append(tuple(s == B for s in tree.shape))
    elif type(tree) in _CONTAINERS:
        for leaf in (tree.values() if type(tree) is dict else tree):
            _input_patterns(leaf, B, out)
    elif isinstance(tree, _SCALARS):
        out.append(None)
    else:
        out.append(tuple(_pattern(x.shape, B) if isinstance(x, torch.Tensor) else None
                         for x in tree_flatten(tree)[0]))


def layout_key(call: object, B: int) -> Hashable:
    """What the batch axes of a recorded call can depend on: its path and size-``B`` axes.

    The module path, whether it is a rule unit, and which axes of each input tensor and
    of each output leaf have size ``B``. Two calls with the same key have tensors of the
    same ranks, in the same places, with ``B`` on the same axes; a call whose key was not
    checked is checked.
    """
    unit = call.unit
    outs = tuple(None if s is None else tuple(d == B for d in s) for s in call.out_shapes)
    if unit.rule is not None and not call.kwargs and len(call.args) == 1:
        # A rule call records only its input (capture): the common case, no walk.
        A = call.args[0]
        return unit.path, False, (tuple(s == B for s in A.shape),), outs
    ins: list = []
    _input_patterns(call.args, B, ins)
    _input_patterns(call.kwargs, B, ins)
    return unit.path, unit.rule is None, tuple(ins), outs


def sample_weights(B: int, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` weights ``2^e_i`` with ``e_i = (2i mod 5) − 2``: ¼, 1, 4, ½, 2, ¼, ...

    Powers of two, so that weighting commutes with rounding: every value the backward pass
    computes from sample ``i``'s loss alone is scaled by exactly ``w_i``, and a correct
    layout gives ``Gw == w ⊙ G`` bit for bit, even where ``G`` is pure rounding noise (a
    loss that a normalisation makes constant). Any five consecutive samples get five
    different weights, a factor 16 apart at most; a row mixing samples is off by O(1).
    """
    e = (2 * torch.arange(B, dtype=torch.float64)) % 5 - 2
    return torch.exp2(e).to(device=like.device, dtype=like.dtype)


def _rtol(*tensors: torch.Tensor) -> float:
    """Allowance for backward kernels that do not round the same way twice.

    With power-of-two weights a deterministic backward pass gives an exact match; atomic
    (GPU) reductions may reorder sums. A row that mixes samples is off by a relative
    amount of order one (weights a factor 2 to 16 apart).
    """
    dtypes = {t.dtype for t in tensors}
    if dtypes & set(HALF):
        return 5e-2
    if dtypes <= {torch.float64, torch.complex128}:
        return 1e-6
    return 1e-2


def valid_dims(
    G: torch.Tensor, Gw: torch.Tensor, w: torch.Tensor, B: int, half: bool = False
) -> frozenset[int]:
    """The axes ``d`` of size ``B`` along which ``Gw == w ⊙_d G`` (up to rounding).

    Args:
        G: Gradient of ``losses.sum()`` at an output, any shape.
        Gw: Gradient of ``(w * losses).sum()`` at the same output.
        w: The weights, ``(B,)``.
        B: The number of losses.
        half: The call ran in 16-bit (autocast); widens the tolerance.

    Returns:
        Those axes; every axis of size ``B`` if ``G`` is zero (nothing to tell them apart).
        Non-finite entries are left out: a NaN sample is ``NonFiniteGradientError``'s to
        report, by index, after this check.
    """
    rtol = 5e-2 if half else _rtol(G, Gw)
    G32 = G.to(torch.promote_types(G.dtype, torch.float32))
    Gw32 = Gw.to(G32.dtype)
    finite = torch.isfinite(G32) & torch.isfinite(Gw32)
    if not bool(finite.all()):
        G32, Gw32 = G32.where(finite, 0), Gw32.where(finite, 0)
    w32 = w.to(G32.dtype)
    out = set()
    for d, size in enumerate(G.shape):
        if size != B:
            continue
        shape = [1] * G.dim()
        shape[d] = B
        scaled = G32 * w32.view(shape)
        if float((Gw32 - scaled).norm()) <= rtol * float(scaled.norm()):
            out.add(d)
    return frozenset(out)


def informative(grads: Sequence[torch.Tensor | None]) -> bool:
    """Whether a check on these gradients may be remembered.

    Some entry must be non-zero (a zero gradient cannot tell axes apart) and none NaN or
    Inf (that step fails anyway).
    """
    present = [g for g in grads if g is not None]
    return any(bool((g != 0).any()) for g in present) and all(
        bool(torch.isfinite(g).all()) for g in present)


def check_rule_call(call: object, dims: Dims, B: int) -> None:
    """Raises if a rule call's input rows are not its samples (axis 0 is not valid).

    Args:
        call: The recorded call of a rule unit (one output).
        dims: Its valid axes (``valid_dims`` of its one output).
        B: The number of losses.

    Raises:
        UnsupportedModelError: Naming the module, with the fix.
    """
    valid = dims[0]
    if valid is None or 0 in valid or not call.out_shapes[0] or call.out_shapes[0][0] != B:
        return  # a dim 0 of another size is check_batch_sizes' error, with its own fix
    unit = call.unit
    where = (f"the batch is along dim {min(valid)} of its output" if valid
             else "no axis of its output holds one sample per slice")
    raise UnsupportedModelError(
        f"privgrad: module '{unit.path}' ({type(unit.module).__name__}) received an input "
        f"whose dim 0 has the batch size {B} but is not the batch dimension: weighting each "
        f"sample's loss does not weight the rows of its output gradient ({where}). Its rows "
        "are time steps, positions or a mix of samples, so per-sample gradients computed "
        "from them would each mix every sample and clipping would not bound any sample's "
        "contribution. This happens with a sequence-first input (T, B, ...) whose length "
        "T equals B, with an input shared by all samples (torch.arange(T) with T == B), "
        "or with losses that mix samples. Fix: put the batch first — batch_first=True for "
        "nn.LSTM/nn.GRU/nn.MultiheadAttention/nn.Transformer*, x.transpose(0, 1) for your "
        "own sequence-first tensors, layer(torch.arange(T).expand(B, T)) for positions — "
        "and return losses of shape (B,) where losses[i] depends on sample i only."
    )


def check_functional_dim(call: object, leaf: int, dim: int, dims: Dims, B: int) -> None:
    """Raises if the fallback would split output ``leaf`` along an axis the losses do not.

    Raises:
        UnsupportedModelError: Naming the module, with the fix.
    """
    valid = dims[leaf] if leaf < len(dims) else None
    if valid is None or dim in valid:
        return
    unit = call.unit
    where = (f"along dim {min(valid)}" if valid else "not along any one axis")
    raise UnsupportedModelError(
        f"privgrad: module '{unit.path}' ({type(unit.module).__name__}) has no per-sample "
        f"rule, and its output {leaf} has the batch size {B} along dim {dim}, where its "
        f"input was split into samples, but the losses depend on that output {where}. The "
        "re-run of one 'sample' would be a time step or a position mixing every sample, so "
        "its per-sample gradients and norms would be wrong and clipping would bound "
        "nothing. This happens with sequence-first tensors whose length equals the batch "
        "size (a layer without batch_first applied to (T, B, ...)), or with losses that "
        "mix samples. Fix: put the batch first (batch_first=True, or x.transpose(0, 1) "
        "before the model), or register a per-sample rule for this module "
        "(privgrad.per_sample.registry), and return losses of shape (B,) where losses[i] "
        "depends on sample i only."
    )
