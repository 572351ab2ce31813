"""Gaussian noise for the clipped sum: secure (OS entropy) or seeded (reproducible).

``seed=None`` draws a fresh 64-bit seed from the operating system's entropy pool
(``os.urandom``) for every step, so no step's noise can be predicted from another's.
The floating-point Gaussian sampler itself is PyTorch's; like every PyTorch DP library
without a dedicated secure sampler, it is not hardened against floating-point attacks
(Mironov, 2012). An integer ``seed`` makes runs reproducible and is NOT secure: anyone
who knows the seed can subtract the noise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch

_Spec = tuple[tuple[str, torch.Size, torch.dtype, torch.device], ...]


class NoiseSource:
    """Draws the noise of each step.

    Args:
        seed: ``None`` for OS entropy (secure), an int for reproducible noise (NOT secure).
    """

    def __init__(self, seed: int | None = None, prefetch: bool = True) -> None:
        self.seed = seed
        self.prefetch = prefetch
        self._gens: dict[torch.device, torch.Generator] = {}
        self._pending: tuple[_Spec, Future, dict] | None = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def secure(self) -> bool:
        """``True`` when noise is seeded from OS entropy."""
        return self.seed is None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.seed is None:
            g = torch.Generator(device=device)
            g.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
            return g
        if device not in self._gens:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._gens[device] = g
        return self._gens[device]

    def _draw(self, spec: _Spec) -> dict[str, torch.Tensor]:
        """Standard normals for ``spec``, in order, from the generators."""
        gens: dict[torch.device, torch.Generator] = {}
        out = {}
        for n, shape, dtype, device in spec:
            if device not in gens:
                gens[device] = self._generator(device)
            out[n] = torch.empty(shape, dtype=dtype, device=device).normal_(
                generator=gens[device]
            )
        return out

    def _take(self, spec: _Spec) -> dict[str, torch.Tensor]:
        """The prefetched draw for ``spec`` if there is one, else a draw now."""
        if self._pending is not None:
            pending_spec, future, states = self._pending
            self._pending = None
            z = future.result()
            if pending_spec == spec:
                return z
            self._restore(states)  # shapes changed: redo the same draw for the new shapes
        return self._draw(spec)

    def gaussian(
        self, like: Mapping[str, torch.Tensor], std: float
    ) -> dict[str, torch.Tensor]:
        """Independent ``N(0, std²)`` noise shaped like each tensor, in order.

        Args:
            like: ``{name: tensor}``; the noise has each tensor's shape, dtype and device.
            std: Standard deviation ``σ·sensitivity`` (0 gives zeros).

        Returns:
            ``{name: noise}``.
        """
        if std == 0:
            return {n: torch.zeros_like(t) for n, t in like.items()}
        spec = tuple((n, t.shape, t.dtype, t.device) for n, t in like.items())
        z = self._take(spec)
        if self.prefetch and all(d.type == "cpu" for *_, d in spec):
            states = self._states()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="privgrad-noise")
            self._pending = (spec, self._pool.submit(self._draw, spec), states)
        return {n: t.mul_(std) for n, t in z.items()}

    def _states(self) -> dict[torch.device, torch.Tensor]:
        return {d: g.get_state() for d, g in self._gens.items()}

    def _restore(self, states: Mapping[torch.device, torch.Tensor]) -> None:
        for d, st in states.items():
            self._gens[d].set_state(st)

    def _settle(self) -> None:
        """Waits for a pending draw and rewinds the generators to before it."""
        if self._pending is not None:
            _, future, states = self._pending
            self._pending = None
            future.result()
            self._restore(states)

    def state_dict(self) -> dict:
        """Generator states (seeded mode only; secure mode keeps no state)."""
        self._settle()
        return {
            "seed": self.seed,
            "states": {str(d): g.get_state() for d, g in self._gens.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restores generator states saved by ``state_dict``."""
        self._settle()
        self.seed = state["seed"]
        self._gens = {}
        for d, s in state["states"].items():
            g = torch.Generator(device=torch.device(d))
            g.set_state(s)
            self._gens[torch.device(d)] = g
