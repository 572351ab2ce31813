"""Gaussian noise for the clipped sum: secure (OS entropy) or seeded (reproducible).

``seed=None`` draws a fresh 64-bit seed from the operating system's entropy pool
(``os.urandom``) for every step, so no step's noise can be predicted from another's.
The floating-point Gaussian sampler itself is PyTorch's; like every PyTorch DP library
without a dedicated secure sampler, it is not hardened against floating-point attacks
(Mironov, 2012). An integer ``seed`` makes runs reproducible and is NOT secure: anyone
who knows the seed can subtract the noise.

Cost: drawing the Gaussians is the one part of a private step with no counterpart in
non-private training (on a 2-core CPU, ~2 ms for 0.5 M parameters, more than a small
MLP's whole step). The noise is drawn at its final scale in one pass per tensor. Drawing
the next step's noise in a background thread was measured slower on 2 cores (the thread
competes with the step's own kernels) and is not done.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch


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

        Args:
            like: ``{name: tensor}``; the noise has each tensor's shape, dtype and device.
            std: Standard deviation ``σ·sensitivity`` (0 gives zeros).

        Returns:
            ``{name: noise}``.
        """
        if std == 0:
            return {n: torch.zeros_like(t) for n, t in like.items()}
        out = {}
        gens: dict[torch.device, torch.Generator] = {}
        for n, t in like.items():
            if t.device not in gens:
                gens[t.device] = self._generator(t.device)
            z = torch.empty_like(t)
            z.normal_(0.0, std, generator=gens[t.device])
            out[n] = z
        return out

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
