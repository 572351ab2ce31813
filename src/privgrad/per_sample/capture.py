"""Recording of layer inputs and outputs: the ONLY place in privgrad that touches hooks.

``Capture`` installs one forward hook per unit (see ``plan.py``). Each forward call of a
unit, made with gradients enabled, appends a ``Call`` — the detached inputs and the
gradient edges of its outputs — to a list owned by the capture object; nothing is stored
on the module or on tensors. ``DPEngine.backward`` takes the calls and differentiates the
summed loss with respect to those edges to obtain each call's output gradient ``G``.
Gradient edges are taken at forward time, so an in-place op applied later to the output
(``nn.ReLU(inplace=True)``) does not change which value ``G`` is the gradient of.

A call made *inside* the forward of a functional unit that claims the same parameters is
not recorded: the functional unit's re-run already covers it, and recording both would
count those parameters' gradients twice. The same module called on its own is recorded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_map

from privgrad.per_sample.plan import Unit

_STATE = threading.local()


def _suspended() -> bool:
    return getattr(_STATE, "depth", 0) > 0


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Disables recording in this thread (used when privgrad re-runs a forward itself)."""
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


@dataclass
class Call:
    """One forward call of a unit.

    Attributes:
        unit: The unit that was called.
        args: Positional inputs, tensors detached.
        kwargs: Keyword inputs, tensors detached.
        out_shapes: Shape of each output leaf (``tree_flatten`` order), ``None`` for
            non-tensor leaves.
        edges: Gradient edge of each output leaf, ``None`` where it carries no gradient.
    """

    unit: Unit
    args: tuple
    kwargs: dict[str, Any]
    out_shapes: list[torch.Size | None]
    edges: list[GradientEdge | None] = field(repr=False)


def _outputs(output: Any) -> tuple[list[torch.Size | None], list[GradientEdge | None]]:
    shapes: list[torch.Size | None] = []
    edges: list[GradientEdge | None] = []
    for leaf in tree_flatten(output)[0]:
        is_t = isinstance(leaf, torch.Tensor)
        shapes.append(leaf.shape if is_t else None)
        edges.append(get_gradient_edge(leaf) if is_t and leaf.requires_grad else None)
    return shapes, edges


def _layer_input(unit: Unit, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The input tensor of a rule unit, given positionally or as ``input=``."""
    if args:
        return args[0]
    if "input" in kwargs:
        return kwargs["input"]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(
        f"privgrad: module '{unit.path}' ({type(unit.module).__name__}) was called without an "
        "input tensor. Fix: call it as module(x)."
    )


class Capture:
    """Records the forward calls of a set of units until ``close()``.

    Args:
        units: The units to record (from ``plan_units``).
    """

    def __init__(self, units: list[Unit]) -> None:
        self._calls: list[Call] = []
        self._active: list[frozenset[int]] = []  # params claimed by running functional units
        self._handles = []
        for unit in units:
            if unit.rule is None:
                claimed = frozenset(id(p) for p in unit.params.values())
                self._handles.append(unit.module.register_forward_pre_hook(
                    self._make_enter(claimed)))
                self._handles.append(unit.module.register_forward_hook(
                    self._make_exit(), always_call=True))
            hook = self._make_hook(unit)
            self._handles.append(unit.module.register_forward_hook(hook, with_kwargs=True))

    def _make_enter(self, claimed: frozenset[int]):  # noqa: ANN202
        def enter(module, args):  # noqa: ANN001, ANN202
            self._active.append(claimed)

        return enter

    def _make_exit(self):  # noqa: ANN202
        def leave(module, args, output):  # noqa: ANN001, ANN202
            if self._active:
                self._active.pop()

        return leave

    def _inside_claimer(self, unit: Unit) -> bool:
        mine = {id(p) for p in unit.params.values()}
        return any(not mine.isdisjoint(frame) for frame in self._active)

    def _make_hook(self, unit: Unit):  # noqa: ANN202
        rule_unit = unit.rule is not None

        def hook(module, args, kwargs, output):  # noqa: ANN001, ANN202
            if _suspended() or not torch.is_grad_enabled():
                return None
            if not any(p.requires_grad for p in unit.params.values()):
                return None
            if self._active and self._inside_claimer(unit):
                return None
            shapes, edges = _outputs(output)
            if not any(e is not None for e in edges):
                return None
            if rule_unit:
                A = _layer_input(unit, args, kwargs).detach()
                self._calls.append(Call(unit, (A,), {}, shapes, edges))
            else:
                self._calls.append(Call(
                    unit, tree_map(_detach, tuple(args)), tree_map(_detach, kwargs), shapes, edges
                ))
            return None

        return hook

    def take(self) -> list[Call]:
        """Returns the calls recorded since the last ``take()`` and forgets them."""
        calls, self._calls = self._calls, []
        return calls

    def close(self) -> None:
        """Removes every hook; the model is left exactly as it was."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._calls = []
        self._active = []
