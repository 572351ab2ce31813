"""Gaussian noise for the clipped sum: secure (OS entropy) or seeded (reproducible).

``seed=None`` draws a fresh 64-bit seed from the operating system's entropy pool
(``os.urandom``) for every step, so no step's noise can be predicted from another's.
The floating-point Gaussian sampler itself is PyTorch's; like every PyTorch DP library
without a dedicated secure sampler, it is not hardened against floating-point attacks
(Mironov, 2012). An integer ``seed`` makes runs reproducible and is NOT secure: anyone
who knows the seed can subtract the noise.

Cost: drawing the Gaussians is the one part of a private step with no counterpart in
non-private training (on a 2-core CPU, ~1.4 ms for 0.5 M parameters, close to a small
MLP's whole step). The noise is drawn at its final scale and added to the gradient in
place, ``CHUNK`` values at a time on CPU (``add_gaussian``), so a step never holds a second
parameter-sized noise tensor; the values are not kept either: a ``NoiseDraw`` records the
generator state before the draw and draws exactly the same values again on request.
Drawing the next step's noise in a background thread was measured slower on 2 cores (the
thread competes with the step's own kernels) and is not done.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

CHUNK = 1 << 16
"""Values drawn per sampler call by ``add_gaussian`` on CPU (256 KiB of float32: stays in
cache until added; a multiple of 16, as PyTorch's CPU sampler transforms 16 at a time)."""

ACCELERATOR_CHUNK = 1 << 24
"""Values per sampler call on other devices (a kernel launch costs more than a cache miss
there; 64 MiB of float32 at most)."""


def chunk_size(device: torch.device) -> int:
    """Values drawn per sampler call on ``device`` (the same for a draw and its replay)."""
    return CHUNK if device.type == "cpu" else ACCELERATOR_CHUNK


def fresh_seed() -> int:
    """A 63-bit seed from the operating system's entropy pool (``os.urandom``)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with ``fresh_seed()`` when it is ``None``."""
    return torch.Generator().manual_seed(fresh_seed() if seed is None else int(seed))


class NoiseSource:
    """Draws the noise of each step.

    Args:
        seed: ``None`` for OS entropy (secure), an int for reproducible noise (NOT secure).
        entropy: Where a secure draw gets its fresh seed (default ``os.urandom``); under
            ``torch.distributed`` a seed broadcast from rank 0, so all ranks draw alike.
    """

    def __init__(
        self, seed: int | None = None, entropy: Callable[[], int] | None = None
    ) -> None:
        self.seed = seed
        self.entropy = entropy or fresh_seed
        self._gens: dict[torch.device, torch.Generator] = {}

    @property
    def secure(self) -> bool:
        """``True`` when noise is seeded from OS entropy."""
        return self.seed is None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.seed is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.entropy())
            return g
        if device not in self._gens:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._gens[device] = g
        return self._gens[device]

    def gaussian(
        self, like: Mapping[str, torch.Tensor], std: float
    ) -> dict[str, torch.Tensor]:
        """Independent ``N(0, std²)`` noise shaped like each tensor, in order.

        The same draws as ``add_gaussian`` on zeros (one sampling path for both).

        Args:
            like: ``{name: tensor}``; the noise has each tensor's shape, dtype and device.
            std: Standard deviation ``σ·sensitivity`` (0 gives zeros).

        Returns:
            ``{name: noise}``.
        """
        out = {n: torch.zeros_like(t, memory_format=torch.contiguous_format)
               for n, t in like.items()}
        self.add_gaussian(out, std)
        return out

    def add_gaussian(self, targets: Mapping[str, torch.Tensor], std: float) -> NoiseDraw:
        """Adds independent ``N(0, std²)`` noise to each tensor, in place and in order.

        The noise is drawn ``chunk_size(device)`` values at a time into a buffer and added,
        so no parameter-sized noise tensor is ever allocated; ``t + noise`` is computed
        exactly as ``torch.add(t, noise)`` would.

        Args:
            targets: ``{name: tensor}``, each contiguous; modified in place.
            std: Standard deviation ``σ·sensitivity`` (0 adds nothing).

        Returns:
            A ``NoiseDraw`` from which ``.values()`` draws exactly the same noise again.
        """
        layout = {n: (t.shape, t.dtype, t.device) for n, t in targets.items()}
        if std == 0:
            return NoiseDraw(0.0, {}, layout)
        gens: dict[torch.device, torch.Generator] = {}
        states: dict[torch.device, torch.Tensor] = {}
        buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        largest = max((x.numel() for x in targets.values()), default=0)
        for n, t in targets.items():  # before any noise is drawn or added
            if not t.is_contiguous():
                raise ValueError(f"privgrad: add_gaussian adds noise in place to contiguous "
                                 f"tensors; {n!r} is not. Fix: pass {n!r}.contiguous().")
        for t in targets.values():
            if t.device not in gens:
                gens[t.device] = self._generator(t.device)
                states[t.device] = gens[t.device].get_state()
            key = (t.dtype, t.device)
            if key not in buffers:
                size = min(chunk_size(t.device), largest)
                buffers[key] = torch.empty(size, dtype=t.dtype, device=t.device)
            _draw(t.view(-1), std, gens[t.device], buffers[key])
        return NoiseDraw(float(std), states, layout)

    def scalar(self, std: float) -> float:
        """One ``N(0, std²)`` draw (float64, CPU), e.g. for a noisy count."""
        return float(self.gaussian({"scalar": torch.zeros((), dtype=torch.float64)}, std)["scalar"])

    def state_dict(self) -> dict:
        """Generator states (seeded mode only; secure mode keeps no state)."""
        return {
            "seed": self.seed,
            "states": {str(d): g.get_state() for d, g in self._gens.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restores generator states saved by ``state_dict``."""
        self.seed = state["seed"]
        self._gens = {}
        for d, s in state["states"].items():
            g = torch.Generator(device=torch.device(d))
            g.set_state(s)
            self._gens[torch.device(d)] = g


@dataclass(frozen=True, eq=False)
class NoiseDraw:
    """The record of one ``add_gaussian`` call: draws exactly the same noise again. NOT PRIVATE.

    Anyone holding it can recompute the noise that was added (and subtract it from the
    private gradient), exactly like holding the noise itself; with a seeded engine the
    recorded generator state also determines the noise of every later step.

    Attributes:
        std: Standard deviation of every value (0: no noise was added).
        states: Generator state before the draw, per device.
        layout: ``{name: (shape, dtype, device)}`` of the targets, in drawing order.
    """

    std: float
    states: dict[torch.device, torch.Tensor]
    layout: dict[str, tuple[torch.Size, torch.dtype, torch.device]]

    def values(self) -> dict[str, torch.Tensor]:
        """``{name: noise}``: the values that ``add_gaussian`` added, bit for bit."""
        if self.std == 0:
            return {n: torch.zeros(s, dtype=d, device=dev)
                    for n, (s, d, dev) in self.layout.items()}
        out = {n: torch.empty(s, dtype=d, device=dev) for n, (s, d, dev) in self.layout.items()}
        gens = {}
        for dev, state in self.states.items():
            gens[dev] = torch.Generator(device=dev)
            gens[dev].set_state(state)
        for z in out.values():
            _draw(z.view(-1), self.std, gens[z.device], None)
        return out


def _draw(flat: torch.Tensor, std: float, gen: torch.Generator, buf: torch.Tensor | None) -> None:
    """Noise for the 1-d ``flat``, ``chunk_size(device)`` values per sampler call.

    Drawn into ``buf`` and added to ``flat`` in place, or (``buf=None``) written into
    ``flat``: the same sampler calls either way, hence the same values.
    """
    step = chunk_size(flat.device)
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step]
        z = part if buf is None else buf[: part.numel()]
        z.normal_(0.0, std, generator=gen)
        if buf is not None:
            part.add_(z)
