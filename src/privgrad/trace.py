"""``StepTrace``: the immutable record of one private step.

NOT PRIVATE: every field except ``private_grad`` is computed from individual samples
(their gradients, norms, clip factors, the exact noise that was added). Releasing any of
them — logging to a shared dashboard, saving next to a published model — breaks the
differential-privacy guarantee that ``engine.epsilon`` reports. Only ``private_grad``
(what was written to ``p.grad``) is covered by that guarantee.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from privgrad.per_sample.batch import LayerIO, per_sample_grads

KEEPABLE = ("pre_clip", "post_clip")


def private_gradient(
    clipped_sum: Mapping[str, torch.Tensor],
    noise: Mapping[str, torch.Tensor],
    expected_batch_size: float,
) -> dict[str, torch.Tensor]:
    """``(clipped sum + noise) / expected_batch_size`` per parameter.

    Args:
        clipped_sum: ``{name: p.shape}``.
        noise: ``{name: p.shape}``.
        expected_batch_size: The fixed normaliser (not the realised batch size, which
            is itself private under Poisson sampling).
    """
    return {n: torch.add(s, noise[n]).div_(expected_batch_size) for n, s in clipped_sum.items()}


def _broadcast(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return f.reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype)


@dataclass(frozen=True, eq=False)
class StepTrace:
    """Every stage of one DP-SGD step's per-sample pipeline.

    NOT PRIVATE: all fields except ``private_grad`` are derived from individual samples.

    Attributes:
        norms: ``(B,)`` total L2 norm of each sample's gradient before clipping (over all
            trainable parameters).
        layer_norms: ``{param name: (B,)}`` per-parameter per-sample L2 norms.
        clip_factors: ``(B,)`` factor applied to each sample's gradient; with
            ``PerLayer`` clipping, ``{group name: (B,)}``.
        param_clip_factors: ``{param name: (B,)}`` the factor applied to each parameter.
        clipped_sum: ``{param name: p.shape}`` sum over samples of clipped gradients.
        noise: ``{param name: p.shape}`` the Gaussian noise added to the clipped sum.
        noise_std: Standard deviation of ``noise`` (``σ · sensitivity``).
        expected_batch_size: The normaliser of the private gradient.
        batch_size: ``B``, the number of samples in this step.
    """

    norms: torch.Tensor
    layer_norms: dict[str, torch.Tensor]
    clip_factors: torch.Tensor | dict[str, torch.Tensor]
    param_clip_factors: dict[str, torch.Tensor]
    clipped_sum: dict[str, torch.Tensor]
    noise: dict[str, torch.Tensor]
    noise_std: float
    expected_batch_size: float
    batch_size: int
    _ios: list[LayerIO] = field(repr=False)
    _names: dict[int, str] = field(repr=False)
    _shapes: dict[str, torch.Size] = field(repr=False)
    _kept: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    _snapshot: dict[int, torch.Tensor] = field(repr=False, default_factory=dict)

    @property
    def private_grad(self) -> dict[str, torch.Tensor]:
        """``{param name: p.shape}`` = (clipped_sum + noise) / expected_batch_size.

        This is exactly what was written to ``p.grad``, and the only private field.
        """
        return private_gradient(self.clipped_sum, self.noise, self.expected_batch_size)

    @property
    def kept(self) -> tuple[str, ...]:
        """Which per-sample gradients are held in memory (``keep=`` of the step)."""
        return tuple(self._kept)

    def _indices(self, samples: Sequence[int] | torch.Tensor | None) -> torch.Tensor | None:
        if samples is None:
            return None
        idx = torch.as_tensor(samples, dtype=torch.long).reshape(-1)
        bad = idx[(idx < -self.batch_size) | (idx >= self.batch_size)]
        if bad.numel():
            raise IndexError(
                f"privgrad: sample index {int(bad[0])} is out of range for this step's batch "
                f"of {self.batch_size} samples. Fix: pass indices in [0, {self.batch_size})."
            )
        return idx % max(self.batch_size, 1)

    def per_sample_grads(
        self,
        clipped: bool = False,
        samples: Sequence[int] | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample gradients before or after clipping. NOT PRIVATE.

        Kept gradients (``keep=`` at the step) are indexed; otherwise only the requested
        samples are materialised from the recorded layer inputs and output gradients (and,
        for modules without a rule, a copy of their parameters taken at the step), so the
        answer is the same before and after ``optimizer.step()``.

        Args:
            clipped: ``False`` for the raw gradients, ``True`` for
                ``param_clip_factors[name][:, None] * raw``.
            samples: Indices into the batch; ``None`` for all ``B`` samples.

        Returns:
            ``{param name: (B or len(samples), *p.shape)}``.
        """
        idx = self._indices(samples)
        kind = "post_clip" if clipped else "pre_clip"
        if kind in self._kept:
            full = self._kept[kind]
            return full if idx is None else {n: g.index_select(0, idx) for n, g in full.items()}
        if "pre_clip" in self._kept:
            raw = self._kept["pre_clip"]
            raw = raw if idx is None else {n: g.index_select(0, idx) for n, g in raw.items()}
        else:
            raw = per_sample_grads(self._ios, self._names, self.batch_size, idx, self._snapshot)
            k = self.batch_size if idx is None else len(idx)
            for n, shape in self._shapes.items():  # empty batch
                if n not in raw:
                    raw[n] = torch.zeros(k, *shape, dtype=self.norms.dtype)
            raw = {n: raw[n] for n in self._shapes}
        if not clipped:
            return raw
        return {n: clip(self.param_clip_factors[n], g, idx) for n, g in raw.items()}


def clip(factors: torch.Tensor, grads: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """``factors[:, None, ...] * grads`` (the factors of the selected samples)."""
    f = factors if idx is None else factors.index_select(0, idx)
    return _broadcast(f, grads) * grads
