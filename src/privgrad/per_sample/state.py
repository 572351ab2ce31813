"""What a forward pass wrote into the model: its parameters and buffers, compared across it.

Anything a forward writes into the model comes from the batch and is released with the
model without clipping or noise (``nn.Embedding(max_norm=...)`` renormalising the
batch's rows, running statistics, a buffer set from the input). ``StateWatch`` takes a
snapshot when a watched forward starts (the outermost forward of the model or of any of
its modules, ``capture.py``) and lists what changed when it ends: a tensor
replaced, added or removed, a version counter moved (every in-place op from Python:
``copy_``, ``+=``, a renorm) and, for floating buffers, a value that changed although the
version did not (native ``batch_norm`` updates ``running_mean`` in its kernel without
moving it). Parameters are not copied (that would be the whole model): a kernel that
writes a parameter without moving its version is not seen.

Nothing here touches hooks (``capture.py`` calls it from its forward hooks) or syncs a
device until ``settle``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain, repeat

import torch
from torch import nn

SMALL = 1 << 16  # floating buffers up to this many elements are copied; larger: checksums

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class StateWrite:
    """A parameter or buffer of the model that a recorded forward changed.

    Attributes:
        path: Path of the owning module in ``root.named_modules()`` (``""``: the root).
        module: The owning module.
        kind: ``"parameter"`` or ``"buffer"``.
        name: The tensor's name in the owning module.
        how: ``"in place"`` (its version counter or, for a floating buffer, its value
            moved: ``copy_``, ``+=``, a renorm, running statistics), ``"replaced"``
            (another tensor assigned: ``self.buf = x.mean(0)``), ``"added"`` or
            ``"removed"``.
    """

    path: str
    module: nn.Module = field(repr=False)
    kind: str
    name: str
    how: str


def _flat(tables: list[dict], part: Callable = dict.values) -> list:
    return list(chain.from_iterable(map(part, tables)))


def _versions(values: list) -> list[int]:
    return list(map(getattr, values, repeat("_version"), repeat(-1)))


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """A copy of a small buffer, or two float64 checksums of a large one (no sync)."""
    t = t.detach()
    if t.numel() <= SMALL:
        return t.clone()
    return torch.stack([torch.sum(t, dtype=torch.float64),
                        torch.linalg.vector_norm(t, dtype=torch.float64)])


def _moved(t: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor: does ``t`` differ bit for bit from its fingerprint (NaN-safe)."""
    now = _fingerprint(t)
    if now.shape != before.shape:
        return torch.ones((), dtype=torch.bool, device=t.device)
    bits = _BITS[now.element_size()]
    return (now.view(bits) != before.view(bits)).any()


class StateWatch:
    """Every parameter and buffer of a module tree, to compare across one forward pass.

    A snapshot lists each table's size and, flat, the names, tensors, ids and version
    counters of its entries (built by C-level ``map``s: a forward's own Python overhead
    is the scale to stay well under), plus a fingerprint of each floating buffer. Holding
    the tensors keeps their ``id`` from being reused by a replacement. The detailed walk
    runs only when something changed; the module list is walked again only when a module
    was added, removed or replaced, or a table changed size, between forwards.

    Args:
        root: The model.
    """

    def __init__(self, root: nn.Module) -> None:
        self._root = root
        self._refresh()

    def _refresh(self) -> None:
        modules = list(self._root.named_modules())
        self._children = [m._modules for _, m in modules]
        self._kept = modules  # the children's ids stay unique while this is held
        self._tree = list(map(id, _flat(self._children)))
        self._tables = [(path, m, kind, table) for path, m in modules
                        for kind, table in (("parameter", m._parameters), ("buffer", m._buffers))]
        self._dicts = [table for *_, table in self._tables]
        self._sizes = list(map(len, self._dicts))
        self._buffers = [(i, n) for i, (*_, kind, table) in enumerate(self._tables)
                         if kind == "buffer" for n in table]

    def start(self) -> tuple:
        """A snapshot of the state now."""
        if (list(map(len, self._dicts)) != self._sizes
                or list(map(id, _flat(self._children))) != self._tree):
            self._refresh()
        values = _flat(self._dicts)
        floats = []
        for i, n in self._buffers:
            t = self._dicts[i][n]
            if t is not None and t.is_floating_point():
                floats.append((i, n, t, t._version, _fingerprint(t)))
        return (self._tables, self._sizes, _flat(self._dicts, dict.keys), values,
                list(map(id, values)), _versions(values), floats)

    def changes(
        self, snap: tuple
    ) -> tuple[list[StateWrite], list[tuple[StateWrite, torch.Tensor]]]:
        """What changed since ``snap`` was taken.

        Returns:
            The writes seen from identities and versions, and the floating buffers whose
            value may have moved, each with a 0-dim bool tensor saying so (for ``settle``).
        """
        tables, sizes, names, values, ids, versions, floats = snap
        dicts = [table for *_, table in tables]
        # A floating buffer whose version moved or that was replaced is reported below.
        moved = [(StateWrite(tables[i][0], tables[i][1], "buffer", n, "in place"),
                  _moved(t, before)) for i, n, t, version, before in floats
                 if dicts[i].get(n) is t and t._version == version]
        if list(map(len, dicts)) == sizes:
            now = _flat(dicts)
            if list(map(id, now)) == ids and _versions(now) == versions:
                return [], moved
        out: list[StateWrite] = []
        at = 0
        for (path, m, kind, table), size in zip(tables, sizes, strict=True):
            was = dict(zip(names[at:at + size],
                           zip(values[at:at + size], versions[at:at + size], strict=True),
                           strict=True))
            at += size
            for n, (t, version) in was.items():
                if n not in table:
                    out.append(StateWrite(path, m, kind, n, "removed"))
                elif table[n] is not t:
                    out.append(StateWrite(path, m, kind, n, "replaced"))
                elif t is not None and t._version != version:
                    out.append(StateWrite(path, m, kind, n, "in place"))
            out.extend(StateWrite(path, m, kind, n, "added") for n in table if n not in was)
        return out, moved


def settle(candidates: list[tuple[StateWrite, torch.Tensor]]) -> list[StateWrite]:
    """The candidate writes whose flag is true (one device sync per device)."""
    by_device: dict[torch.device, list[tuple[StateWrite, torch.Tensor]]] = {}
    for w, flag in candidates:
        by_device.setdefault(flag.device, []).append((w, flag))
    out = []
    for items in by_device.values():
        flags = torch.stack([f for _, f in items]).tolist()
        out.extend(w for (w, _), f in zip(items, flags, strict=True) if f)
    return out
