"""Gaussian noise for the clipped sum: secure (OS entropy) or seeded (reproducible).

``seed=None`` draws a fresh 64-bit seed from the operating system's entropy pool
(``os.urandom``) for every step, so no step's noise can be predicted from another's.
The floating-point Gaussian sampler itself is PyTorch's; like every PyTorch DP library
without a dedicated secure sampler, it is not hardened against floating-point attacks
(Mironov, 2012). An integer ``seed`` makes runs reproducible and is NOT secure: anyone
who knows the seed can subtract the noise.

Cost: drawing the Gaussians is the one part of a private step with no counterpart in
non-private training (on a 2-core CPU about as long as a small MLP's whole step:
docs/performance.md). The noise is written into the tensors that become ``p.grad``, so a
step never holds a separate noise tensor: added ``CHUNK`` values at a time
(``add_gaussian``), or written first (``fill_gaussian``). The values are not kept
either: a ``NoiseDraw`` records the generator state before the draw and draws exactly the
same values again on request. Every path draws each tensor in the same chunks, so the
three give the same values for the same generator state.

Precision: the engine's clipped sums are float32 or wider (a 16-bit parameter's is
float32), so its noise is drawn and added in float32 or wider; rounding to a 16-bit
``p.grad`` happens once, after (``privgrad.step.release``). A 16-bit target given directly
still gets float32 draws rounded to its dtype (``_sampling_dtype``).

PyTorch's CPU sampler runs on one core. Drawing on a second thread (the next step's noise
in the background, or half of this step's) is slower on 2 cores: after the step's kernels
PyTorch's OpenMP workers keep spinning on the other core, and a second drawing thread gets
half of it (measurements in docs/performance.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

CHUNK = 1 << 15
"""Values drawn per sampler call on the CPU. The buffer of ``add_gaussian`` (128 KiB of
float32) stays in the core's cache while its values are added, and it is the only
memory the noise adds to a step whose gradients are already all alive; larger buffers
buy little time for more peak memory (docs/performance.md)."""

CHUNK_ACCELERATOR = 1 << 22
"""Values drawn per sampler call on other devices (fewer, larger kernel launches)."""


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

        The same draws as ``fill_gaussian`` (one sampling path for both).

        Args:
            like: ``{name: tensor}``; the noise has each tensor's shape, dtype and device.
            std: Standard deviation ``σ·sensitivity`` (0 gives zeros).

        Returns:
            ``{name: noise}``.
        """
        out = {n: torch.empty_like(t, memory_format=torch.contiguous_format)
               for n, t in like.items()}
        self.fill_gaussian(out, std)
        return out

    def fill_gaussian(self, targets: Mapping[str, torch.Tensor], std: float) -> NoiseDraw:
        """Overwrites each tensor with independent ``N(0, std²)`` noise, in place and in order.

        One generator per device; one sampler call per chunk of ``CHUNK`` values.

        Args:
            targets: ``{name: tensor}``, each contiguous; overwritten.
            std: Standard deviation ``σ·sensitivity`` (0 writes zeros).

        Returns:
            A ``NoiseDraw`` from which ``.values()`` draws exactly the same noise again.
        """
        return self._in_place(targets, std, None, "fill_gaussian")

    def add_gaussian(
        self, targets: Mapping[str, torch.Tensor], std: float, divisor: float = 1.0
    ) -> NoiseDraw:
        """``t ← (t + N(0, std²)) / divisor`` for each tensor, in place, in order.

        The noise is drawn ``CHUNK`` values at a time into one small buffer per tensor
        and added to that part of the tensor at once, so no tensor of noise is ever held.
        Bit for bit ``(t + noise) / divisor`` with the noise ``fill_gaussian`` would
        have written from the same generator state (IEEE addition commutes).

        Args:
            targets: ``{name: tensor}``, each contiguous; updated in place.
            std: Standard deviation ``σ·sensitivity`` (0 adds nothing).
            divisor: Each value is divided by it after the noise is added.

        Returns:
            A ``NoiseDraw`` from which ``.values()`` draws exactly the same noise again.
        """
        def add(part: torch.Tensor, noise: torch.Tensor | None) -> None:
            part.add_(0.0 if noise is None else noise)  # -0.0 + 0.0 = +0.0 as in fill
            if divisor != 1:
                part.div_(divisor)

        return self._in_place(targets, std, add, "add_gaussian")

    def _in_place(
        self,
        targets: Mapping[str, torch.Tensor],
        std: float,
        combine: Callable[[torch.Tensor, torch.Tensor | None], None] | None,
        caller: str,
    ) -> NoiseDraw:
        layout = {n: (t.shape, t.dtype, t.device) for n, t in targets.items()}
        for n, t in targets.items():  # before any noise is drawn
            if not t.is_contiguous():
                raise ValueError(f"privgrad: {caller} writes noise in place into contiguous "
                                 f"tensors; {n!r} is not. Fix: pass {n!r}.contiguous().")
        if std == 0:
            for t in targets.values():
                if combine is None:
                    t.zero_()
                else:
                    combine(t, None)
            return NoiseDraw(0.0, {}, layout)
        gens = {d: self._generator(d) for d in dict.fromkeys(t.device for t in targets.values())}
        states = {d: g.get_state() for d, g in gens.items()}
        _draw(targets.values(), float(std), gens, combine)
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
        self._gens = {torch.device(d): _restored(torch.device(d), s)
                      for d, s in state["states"].items()}


@dataclass(frozen=True, eq=False)
class NoiseDraw:
    """The record of one ``fill_gaussian`` or ``add_gaussian`` call. NOT PRIVATE.

    Draws exactly the same noise again.

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
        """``{name: noise}``: the values the draw wrote or added, bit for bit."""
        if self.std == 0:
            return {n: torch.zeros(s, dtype=d, device=dev)
                    for n, (s, d, dev) in self.layout.items()}
        out = {n: torch.empty(s, dtype=d, device=dev) for n, (s, d, dev) in self.layout.items()}
        _draw(out.values(), self.std, {d: _restored(d, st) for d, st in self.states.items()})
        return out


def _draw(
    targets: Iterable[torch.Tensor],
    std: float,
    gens: Mapping[torch.device, torch.Generator],
    combine: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> None:
    """The one sampling path of every draw and of its replay.

    In order, one sampler call per chunk of ``CHUNK`` values of each tensor: written
    straight into the chunk, or (``combine``) into a buffer handed with the chunk to
    ``combine(chunk, noise)``. Half-precision tensors get float32 draws rounded to their
    dtype (``_sampling_dtype``).
    """
    for t in targets:
        flat, gen = t.view(-1), gens[t.device]
        size = CHUNK if t.device.type == "cpu" else CHUNK_ACCELERATOR
        dtype = _sampling_dtype(t.dtype)
        direct = combine is None and dtype == t.dtype
        buf = None if direct else torch.empty(
            min(size, flat.numel()), dtype=dtype, device=t.device)
        for start in range(0, flat.numel(), size):
            part = flat[start:start + size]
            if buf is None:
                part.normal_(0.0, std, generator=gen)
                continue
            drawn = buf[:part.numel()].normal_(0.0, std, generator=gen)
            if combine is None:
                part.copy_(drawn)  # rounds to the target's dtype, as .to() does
            else:
                combine(part, drawn.to(t.dtype))


def _sampling_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the Gaussians are drawn in: float32 for 16-bit floats.

    PyTorch 2.11's CPU sampler draws 16-bit floats from uniforms of their own precision
    (4 M bfloat16 draws: |z| never above 3.33, 0.6% exact zeros, no value beyond 4σ where
    a Gaussian has 6.3e-5; float16: |z| at most 3.9): bounded noise, which the privacy
    analysis does not cover. Rounding float32 draws keeps the Gaussian's tails.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _restored(device: torch.device, state: torch.Tensor) -> torch.Generator:
    g = torch.Generator(device=device)
    g.set_state(state)
    return g
