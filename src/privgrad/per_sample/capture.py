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

Given the model's ``root``, the capture also watches every *outermost* forward made with
gradients enabled of the root or of any of its modules (a training loop may call
``model.encoder`` and ``model.head`` itself): it notes each parameter and buffer (its
tensor and version counter) when that forward starts and reports, as ``StateWrite``
values, those changed when it ends (``take_writes``); ``watch_passes`` and
``take_pass_writes`` do the same from the last forward to the end of privgrad's own
backward passes (a tensor hook can write a buffer from the output gradients; so can the
loss function). Inside a watched forward, a trained ``nn.Embedding`` given ids shared by
every sample (``(1, T)`` position ids) gets them expanded to the forward's batch
(``broadcast.py``), so that its per-sample gradients exist. While ``marking`` is on, the
capture hands each outermost forward fresh leaves in place of its floating inputs (the
forward gets a copy, which it may write in place) and keeps the outputs of recorded calls
whose inputs are all integer (token embeddings), so the engine can differentiate the
losses with respect to each sample's input (``take_marked``). ``GradAccumulationGuard``
refuses any backward pass that accumulates into ``p.grad`` of the parameters privgrad
trains. Not watched: writes made between two watched forwards of one step, and the forward
of a leaf module with no parameter or buffer that your code calls on its own (it is then
your code, like anything before ``model(x)``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_map

from privgrad.per_sample.broadcast import leading_batch, shared_ids
from privgrad.per_sample.state import StateWatch, StateWrite, settle
from privgrad.per_sample.units import Unit

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


@dataclass(frozen=True)
class Marked:
    """A tensor of one recorded forward whose dim 0 should be the samples.

    Attributes:
        where: What it is, for messages (``"model input args[0]"``, ...).
        tensor: The tensor; the losses can be differentiated with respect to it.
        broadcast: A size-1 dim 0 is a broadcast over the batch, not a sequence of length 1
            (an embedding of ``(1, T)`` position ids): dim 1 is then not tried as the
            samples.
    """

    where: str
    tensor: torch.Tensor = field(repr=False)
    broadcast: bool = False


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
        root: The model: the outermost forward of it or of any of its modules is watched
            for parameter and buffer writes and, while ``marking``, given marked inputs.
            ``None``: neither.
        marking: The initial value of ``marking`` (the attribute may be changed).
    """

    def __init__(
        self, units: list[Unit], root: nn.Module | None = None, marking: bool = False
    ) -> None:
        self._calls: list[Call] = []
        self._active: list[frozenset[int]] = []  # params claimed by running functional units
        self._handles = []
        self.marking = marking  # mark the inputs of the next recorded forwards
        self._marked: list[Marked] = []
        self._writes: list[StateWrite] = []
        self._moved: list[tuple[StateWrite, torch.Tensor]] = []  # settled at take_writes
        self._depth = 0  # nesting of the watched forward in progress (0: none)
        self._snap: tuple | None = None  # state when that outermost forward started
        self._passes: tuple | None = None  # state when privgrad's own passes started
        self._last: tuple | None = None  # state when the last watched forward started
        self._watch: StateWatch | None = None
        self._batch: int | None = None  # B of the watched forward in progress (broadcast.py)
        if root is not None:
            self._watch = StateWatch(root)
            for path, m in root.named_modules():
                # A training loop may call any module outside model(x); a leaf with no
                # parameter or buffer (an activation) has no state to write, and if your
                # code calls it alone it is your code (not hooked: saves its fast path).
                if m is not root and not (m._modules or m._parameters or m._buffers):
                    continue
                self._handles.append(m.register_forward_pre_hook(
                    self._make_enter_watch(path), with_kwargs=True, prepend=True))
                self._handles.append(m.register_forward_hook(self._leave_watch,
                                                             always_call=True))
                if isinstance(m, nn.Embedding | nn.EmbeddingBag):  # trained ones or frozen
                    self._handles.append(m.register_forward_hook(self._make_mark_frozen(path)))
        for unit in units:
            if isinstance(unit.module, nn.Embedding) and root is not None:
                self._handles.append(unit.module.register_forward_pre_hook(
                    self._expand_shared, with_kwargs=True))
            # Recording runs before the module's other forward hooks (prepend): G is then the
            # gradient at forward's own output, which the rules and the functional re-run
            # (forward only) compute; a user's hook returning a new output acts downstream.
            hook = self._make_hook(unit)
            self._handles.append(unit.module.register_forward_hook(
                hook, with_kwargs=True, prepend=True))
            if unit.rule is None:
                claimed = frozenset(id(p) for p in unit.params.values())
                self._handles.append(unit.module.register_forward_pre_hook(
                    self._make_enter(claimed)))
                self._handles.append(unit.module.register_forward_hook(  # before recording
                    self._make_exit(), always_call=True, prepend=True))

    def _make_enter(self, claimed: frozenset[int]):
        def enter(module, args):
            self._active.append(claimed)

        return enter

    def _make_exit(self):
        def leave(module, args, output):
            if self._active:
                self._active.pop()

        return leave

    def _inside_claimer(self, unit: Unit) -> bool:
        mine = {id(p) for p in unit.params.values()}
        return any(not mine.isdisjoint(frame) for frame in self._active)

    def _make_hook(self, unit: Unit):
        rule_unit = unit.rule is not None

        def hook(module, args, kwargs, output):
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
            if self.marking:
                self._mark_output(unit, args, kwargs, output)
            return None

        return hook

    def _make_enter_watch(self, path: str):
        where = "model input" if path == "" else f"input of module '{path}':"

        def enter(module, args, kwargs):
            if self._depth:  # inside a watched forward: that one covers this call
                self._depth += 1
                return None
            if _suspended() or not torch.is_grad_enabled():
                return None  # an evaluation, or privgrad's own re-run: not recorded
            self._depth = 1
            self._batch = leading_batch(args, kwargs)
            self._snap = self._watch.start()
            return self._mark_inputs(where, args, kwargs) if self.marking else None

        return enter

    def _expand_shared(self, module, args, kwargs):
        """Gives a trained embedding ids shared by the batch as ``(B, ...)`` (broadcast.py)."""
        if (not self._depth or _suspended() or not torch.is_grad_enabled()
                or not module.weight.requires_grad):
            return None
        if args:
            ids = shared_ids(args[0], self._batch)
            return None if ids is None else ((ids, *args[1:]), kwargs)
        ids = shared_ids(kwargs.get("input"), self._batch)
        return None if ids is None else (args, {**kwargs, "input": ids})

    def _leave_watch(self, module, args, output):
        if not self._depth:
            return
        self._depth -= 1
        if not self._depth:
            self._close_watch()

    def _close_watch(self) -> None:
        self._depth = 0
        snap, self._snap = self._snap, None
        self._last = snap
        if snap is not None:
            writes, moved = self._watch.changes(snap)
            self._writes.extend(writes)
            self._moved.extend(moved)

    def _mark_inputs(
        self, where: str, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict]:
        """The inputs, each floating tensor marked; one that needs it is given as a copy."""

        def marker(name: str):
            def one(x: Any) -> Any:
                if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 0
                        ) or x.is_inference():  # an inference tensor cannot be made a leaf
                    return x
                if x.requires_grad:  # already differentiable: the losses' gradient reaches it
                    self._marked.append(Marked(f"{where} {name}", x))
                    return x
                leaf = x.detach().requires_grad_()
                self._marked.append(Marked(f"{where} {name}", leaf))
                # The forward gets a copy (this step only): it may write it in place
                # (x.div_(255), nn.ReLU(inplace=True)), which a leaf forbids.
                return leaf.clone()

            return one

        new_args = tuple(tree_map(marker(f"args[{i}]"), a) for i, a in enumerate(args))
        new_kwargs = {k: tree_map(marker(f"{k}="), v) for k, v in kwargs.items()}
        return new_args, new_kwargs

    def _make_mark_frozen(self, path: str):
        def hook(module, args, output):
            # A trained embedding's output is marked by its unit's hook (_mark_output).
            if (not self.marking or _suspended() or not torch.is_grad_enabled()
                    or not isinstance(output, torch.Tensor) or output.requires_grad
                    or not output.is_floating_point() or output.dim() == 0):
                return None
            leaf = output.detach().requires_grad_()
            self._marked.append(Marked(f"output of module '{path}' ({type(module).__name__})",
                                       leaf, broadcast=True))
            return leaf.clone()  # not a leaf: the forward may still write it in place

        return hook

    def _mark_output(self, unit: Unit, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        """Marks the outputs of a call whose inputs are all integer (token ids cannot be)."""
        if any(isinstance(t, torch.Tensor) and t.is_floating_point()
               for t in tree_flatten((args, kwargs))[0]):
            return
        where = f"output of module '{unit.path}' ({type(unit.module).__name__})"
        self._marked.extend(
            Marked(where, leaf, broadcast=True) for leaf in tree_flatten(output)[0]
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.dim() > 0)

    def take(self) -> list[Call]:
        """Returns the calls recorded since the last ``take()`` and forgets them."""
        calls, self._calls = self._calls, []
        return calls

    def take_writes(self) -> list[StateWrite]:
        """Parameters and buffers the watched forwards changed since the last call.

        Each is named once (in ``named_modules`` order); they are then forgotten.
        """
        if self._depth:  # a forward that never returned (its exit hook did not run)
            self._close_watch()
        writes, self._writes = self._writes + settle(self._moved), []
        self._moved = []
        return _unique(writes)

    def watch_passes(self) -> None:
        """Starts the watch over privgrad's own backward passes (``take_pass_writes``).

        Called after ``take_writes`` found nothing: the state when the last watched
        forward started is then the state when it ended, so it serves (one snapshot less
        per step), and writes made since that forward (the loss function) are seen too.
        """
        snap, self._last = self._last, None
        if snap is None and self._watch is not None:
            snap = self._watch.start()
        self._passes = snap

    def take_pass_writes(self) -> list[StateWrite]:
        """What changed since ``watch_passes`` (a hook writing from the gradients), once each."""
        snap, self._passes = self._passes, None
        if snap is None:
            return []
        writes, moved = self._watch.changes(snap)
        return _unique(writes + settle(moved))

    def take_marked(self) -> list[Marked]:
        """The tensors marked since the last call (see ``marking``), and forgets them."""
        marked, self._marked = self._marked, []
        return marked

    def close(self) -> None:
        """Removes every hook; the model is left exactly as it was."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._calls = []
        self._active = []
        self._marked = []
        self._writes = []
        self._moved = []
        self._depth = 0
        self._snap = self._passes = self._last = None


def _unique(writes: list[StateWrite]) -> list[StateWrite]:
    unique: dict[tuple[str, str, str], StateWrite] = {}
    for w in writes:
        unique.setdefault((w.path, w.kind, w.name), w)
    return list(unique.values())


class GradAccumulationGuard:
    """Refuses, as it happens, any backward pass that accumulates into ``p.grad``.

    privgrad never accumulates into ``.grad`` itself: it assigns ``p.grad`` and takes
    every gradient with ``torch.autograd.grad``. So an accumulation into a trained
    parameter's ``.grad`` is a non-private backward (``loss.backward()``), whose gradient
    an ``optimizer.step()`` would apply unclipped and without noise. A post-accumulate-grad
    hook on each parameter sets its ``.grad`` to ``None`` and raises ``refuse(name)``, which
    stops that backward pass.

    Args:
        params: ``{name: parameter}`` to guard (those requiring grad get a hook).
        refuse: Builds the exception for the parameter named.
    """

    def __init__(
        self, params: Mapping[str, nn.Parameter], refuse: Callable[[str], Exception]
    ) -> None:
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(n, refuse))
                         for n, p in params.items() if p.requires_grad]

    @staticmethod
    def _hook(name: str, refuse: Callable[[str], Exception]):
        def hook(p: torch.Tensor) -> None:
            p.grad = None  # the non-private sum must never reach an optimizer
            raise refuse(name)

        return hook

    def close(self) -> None:
        """Removes every hook."""
        for h in self._handles:
            h.remove()
        self._handles = []
