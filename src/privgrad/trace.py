"""``StepTrace``: the immutable record of one private step.

NOT PRIVATE: every field except ``private_grad`` is computed from individual samples
(their gradients, norms, clip factors, the exact noise that was added). Releasing any of
them — logging to a shared dashboard, saving next to a published model — breaks the
differential-privacy guarantee that ``engine.epsilon`` reports. Only ``private_grad``
(what was written to ``p.grad``) is covered by that guarantee.

Dtypes: for a 16-bit (bfloat16/float16) parameter the clipped sum and the noise are
float32 (the mechanism is computed in float32: the clipped sum accumulated in float32, the
Gaussian noise drawn and added in float32), and ``p.grad`` is their result rounded once to
the parameter's dtype (post-processing of the float32 Gaussian mechanism); so are the
post-clip per-sample gradients (the factor applied in float32). Every other dtype is the
parameter's own throughout.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from privgrad.errors import TraceReleasedError
from privgrad.noise import NoiseDraw
from privgrad.per_sample.chunks import scaled
from privgrad.per_sample.layer_io import LayerIO, first_modified, materialize
from privgrad.step.clip_batch import KEEPABLE

KEEP_OPTIONS = (*KEEPABLE, "clipped_sum")
"""Everything ``keep=`` accepts: the per-sample gradients, and the clipped sum (held by
default; ``keep="clipped_sum"`` holds it for a step of an engine built with
``keep_clipped_sum=False``)."""


def private_gradient(
    clipped_sum: Mapping[str, torch.Tensor],
    noise: Mapping[str, torch.Tensor],
    expected_batch_size: float,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> dict[str, torch.Tensor]:
    """``(clipped sum + noise) / expected_batch_size`` per parameter.

    Computed in the dtype of the clipped sum and the noise, then rounded once to
    ``dtypes[name]`` where given (what ``DPEngine.step`` writes to a 16-bit ``p.grad``).

    Args:
        clipped_sum: ``{name: p.shape}``.
        noise: ``{name: p.shape}``.
        expected_batch_size: The fixed normaliser (not the realised batch size, which
            is itself private under Poisson sampling).
        dtypes: ``{name: dtype}`` to round to (``None``: no rounding).
    """
    dtypes = dtypes or {}
    out = {n: torch.add(s, noise[n]).div_(expected_batch_size) for n, s in clipped_sum.items()}
    return {n: g.to(dtypes.get(n, g.dtype)) for n, g in out.items()}


@dataclass(frozen=True, eq=False)
class Segment:
    """The samples of one physical batch within a logical step.

    Attributes:
        offset: Index of the segment's first sample in the logical step.
        size: Number of samples.
        ios: Recorded layer inputs and output gradients, or ``None`` once released.
        kept: Materialised per-sample gradients (``keep=``), ``{kind: {name: (size, ...)}}``.
        snapshot: Parameter values of functional units at the step (``id -> tensor``).
        versions: Per call, ``(address, version counter)`` of each recorded tensor at the
            step (``batch.versions``), to detect a later change.
    """

    offset: int
    size: int
    ios: list[LayerIO] | None
    kept: dict[str, dict[str, torch.Tensor]]
    snapshot: dict[int, torch.Tensor]
    versions: tuple[tuple[tuple[int, int], ...], ...] = ()


def check_unchanged(seg: Segment) -> None:
    """Raises if a tensor recorded for ``seg`` was modified in place since the step."""
    io = None if seg.ios is None else first_modified(seg.ios, seg.versions)
    if io is not None:
        raise TraceReleasedError(
            f"privgrad: an input, output gradient or buffer that module "
            f"'{io.call.unit.path or '<model>'}' ({type(io.call.unit.module).__name__}) "
            "recorded at this step was modified after the step (an input buffer reused with "
            "copy_() for the next batch, a buffer updated by the next forward, an input that "
            "is a view of a parameter changed by optimizer.step()), so this step's "
            "per-sample gradients and clipped sum can no longer be computed from it. Fix: "
            "read the trace before modifying what the model ran on, pass a fresh tensor per "
            "batch, or hold the per-sample gradients you will read: keep=('pre_clip',)."
        )


@dataclass(frozen=True, eq=False)
class StepTrace:
    """Every stage of one DP-SGD step's per-sample pipeline: a value.

    NOT PRIVATE: all fields except ``private_grad`` are derived from individual samples.
    It holds tensors and records only (no callables): the clipped sum as the step computed
    it, the noise draw's generator state, and, for per-sample gradients asked for later,
    the layer inputs and output gradients of batches accumulated with ``retain=True``.
    A logical step made of several physical batches (``engine.accumulate``) has one trace
    covering all of its samples, in the order they were accumulated.

    Attributes:
        norms: ``(B,)`` total L2 norm of each sample's gradient before clipping (over all
            trainable parameters), the norm it was clipped with. For a book-kept layer
            whose gradient cancels more than ``per_sample.ghost.MAX_CANCELLATION`` times
            (rare: positions cancelling a thousand-fold), that layer's part is its mass
            over that bound, so such a sample is clipped harder than its norm asks.
        layer_norms: ``{param name: (B,)}`` per-parameter per-sample L2 norms.
        clip_factors: ``(B,)`` factor applied to each sample's gradient; with
            ``PerLayer`` clipping, ``{group name: (B,)}``.
        param_clip_factors: ``{param name: (B,)}`` the factor applied to each parameter.
        noise_std: Standard deviation of ``noise`` (``σ · sensitivity``).
        expected_batch_size: The normaliser of the private gradient.
        batch_size: ``B``, the number of samples in this step.
        max_grad_norm: The clipping threshold of the step (flat and adaptive clipping;
            the total sensitivity for per-layer clipping).
    """

    norms: torch.Tensor
    layer_norms: dict[str, torch.Tensor]
    clip_factors: torch.Tensor | dict[str, torch.Tensor]
    param_clip_factors: dict[str, torch.Tensor]
    noise_std: float
    expected_batch_size: float
    batch_size: int
    max_grad_norm: float
    _segments: tuple[Segment, ...] = field(repr=False)
    _noise_draw: NoiseDraw = field(repr=False)
    _clipped_sum: dict[str, torch.Tensor] | None = field(repr=False)
    _names: dict[int, str] = field(repr=False)
    _shapes: dict[str, torch.Size] = field(repr=False)
    _dtypes: dict[str, torch.dtype] = field(default_factory=dict, repr=False)

    @property
    def clipped_sum(self) -> dict[str, torch.Tensor]:
        """``{param name: p.shape}`` sum over samples of clipped gradients. NOT PRIVATE.

        Held by the step, as it was summed before the noise was added. Float32 for a
        16-bit parameter: it is accumulated in float32, as the noise is added to it
        (module doc); the parameter's dtype otherwise.

        Raises:
            TraceReleasedError: If the engine was built with ``keep_clipped_sum=False``
                (the noise was added into the clipped sum's own tensors).
        """
        if self._clipped_sum is None:
            raise TraceReleasedError(
                "privgrad: clipped_sum not kept: the engine was built with "
                "keep_clipped_sum=False, so the step added the noise into the clipped sum's "
                "own tensors, which became p.grad (the private gradient is p.grad itself). "
                "Fix: DPEngine(..., keep_clipped_sum=True) (the default; one parameter-sized "
                "tensor per step), or engine.backward(losses, keep='clipped_sum') for one step."
            )
        return dict(self._clipped_sum)

    @functools.cached_property
    def noise(self) -> dict[str, torch.Tensor]:
        """``{param name: p.shape}`` the Gaussian noise added to the clipped sum. NOT PRIVATE.

        Drawn again, bit for bit, from the generator state recorded at the step (the step
        wrote it into the tensors that became ``p.grad`` and kept no copy); held once
        asked for. Float32 for a 16-bit parameter (drawn and added in float32).
        """
        return self._noise_draw.values()

    @property
    def private_grad(self) -> dict[str, torch.Tensor]:
        """``{param name: p.shape}`` = (clipped_sum + noise) / expected_batch_size.

        This is exactly what was written to ``p.grad``, and the only private field. For
        a 16-bit parameter it is computed in float32 (``clipped_sum`` and ``noise`` are
        float32) and rounded once to the parameter's dtype, as ``p.grad`` holds it: the
        rounding is post-processing of the float32 Gaussian mechanism, so it costs no
        privacy. The unrounded value is ``(clipped_sum + noise) / expected_batch_size``.

        Raises:
            TraceReleasedError: As ``clipped_sum`` (read ``p.grad`` instead).
        """
        return private_gradient(self.clipped_sum, self.noise, self.expected_batch_size,
                                self._dtypes)

    @property
    def clipped_norms(self) -> torch.Tensor:
        """``(B,)`` L2 norm of each sample's gradient after clipping. NOT PRIVATE.

        ``sqrt(sum_p (param_clip_factors[p] · layer_norms[p])²)``: ``clip_factors · norms``
        for flat clipping, and at most ``max_grad_norm`` under every rule.
        """
        total = torch.zeros_like(self.norms)
        for n, ln in self.layer_norms.items():
            total = total + (self.param_clip_factors[n].to(ln.dtype) * ln) ** 2
        return total.sqrt()

    @property
    def kept(self) -> tuple[str, ...]:
        """Which per-sample gradients are held in memory (``keep=`` of the step)."""
        kinds = [set(s.kept) for s in self._segments]
        return tuple(k for k in KEEPABLE if kinds and all(k in ks for ks in kinds))

    def _indices(self, samples: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        if samples is None:
            return torch.arange(self.batch_size)
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
                ``param_clip_factors[name][:, None] * raw`` (float32 for a 16-bit
                parameter: the factor applied in float32, as the clipped sum adds them).
            samples: Indices into the step's samples; ``None`` for all ``B`` samples.

        Returns:
            ``{param name: (B or len(samples), *p.shape)}``.

        Raises:
            TraceReleasedError: If a requested sample's physical batch was accumulated
                without ``retain=True`` and its gradients were not kept, or a tensor it
                recorded was modified in place since the step.
        """
        idx = self._indices(samples)
        kind = "post_clip" if clipped else "pre_clip"
        dtype = self.norms.dtype
        device = self.norms.device
        out = {n: torch.zeros(len(idx), *s, dtype=dtype, device=device)
               for n, s in self._shapes.items()}
        for seg in self._segments:
            pos = ((idx >= seg.offset) & (idx < seg.offset + seg.size)).nonzero().flatten()
            if len(pos) == 0:
                continue
            local = idx[pos] - seg.offset
            part, done = self._segment_grads(seg, kind, local)
            if clipped and not done:
                part = {n: scaled(_select(self.param_clip_factors[n], idx[pos]), g)
                        for n, g in part.items()}
            for n, g in part.items():
                out[n] = out[n].to(g.dtype)
                out[n][pos.to(device)] = g
        return out

    def _segment_grads(
        self, seg: Segment, kind: str, local: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """Raw or clipped grads of some samples of one segment (``done``: already clipped)."""
        for k in (kind, "pre_clip"):
            if k in seg.kept:
                part = {n: g.index_select(0, local.to(g.device)) for n, g in seg.kept[k].items()}
                return part, k != "pre_clip"
        check_unchanged(seg)
        if seg.ios is None:
            raise TraceReleasedError(
                f"privgrad: samples {(local + seg.offset).tolist()[:5]} of this step came from a "
                "physical batch accumulated without retain=True, whose layer inputs were "
                "released to bound memory. Fix: engine.accumulate(losses, retain=True) to "
                "materialise any sample later, or keep=('pre_clip',) to hold its per-sample "
                "gradients."
            )
        raw = materialize(seg.ios, self._names, seg.size, local, seg.snapshot)
        return {n: raw[n] for n in self._shapes if n in raw}, False


def _select(factors: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The factors of the samples ``idx``."""
    return factors.index_select(0, idx.to(factors.device))
