"""Work done by each spawned rank of tests/test_distributed.py (gloo on CPU)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from privgrad import distributed

MODES = ("auto", "ghost", "materialize", "vmap")
RULES = ("flat", "per-layer", "adaptive")
STEPS, GLOBAL_B = 3, 16


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(24, 8),
                         nn.LayerNorm(8), nn.Linear(8, 3)).double()


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_B, 2, 8, generator=g, dtype=torch.float64) * (1 + torch.arange(
        GLOBAL_B, dtype=torch.float64)[:, None, None] / 4)  # norms spread: some are clipped
    return x, torch.randint(0, 3, (GLOBAL_B,), generator=g)


def rule(name: str) -> pg.clipping.ClipRule:
    if name == "per-layer":
        return pg.clipping.PerLayer({"0": 1.9, "3": 3.4, "4": 0.5, "5": 2.3})
    if name == "adaptive":
        return pg.clipping.Adaptive(initial_max_norm=4.5, count_noise_multiplier=2.0)
    return pg.clipping.Flat(4.5)


def run_steps(net: nn.Module, engine: pg.DPEngine, rows: slice | None) -> dict:
    """STEPS steps on this rank's rows of each global batch; p.grad, C and norms per step."""
    out: dict = {"grads": [], "C": [], "norms": []}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(STEPS):
        x, y = data(step)
        if rows is not None:
            x, y = x[rows], y[rows]
        opt.zero_grad()
        trace = engine.backward(F.cross_entropy(net(x), y, reduction="none"))
        out["grads"].append({n: p.grad.clone() for n, p in engine.model.named_parameters()})
        out["C"].append(trace.max_grad_norm)
        out["norms"].append(trace.norms.clone())
        opt.step()
    return out


def scenarios(rank: int, world: int) -> dict:
    results = {}
    rows = slice(rank, None, world)
    for mode in MODES:
        for name in RULES:
            net = model()
            engine = pg.DPEngine(net, 0.0, clipping=rule(name), expected_batch_size=GLOBAL_B,
                                 mode=mode, seed=3, sample_rate=0.5)
            results[(mode, name)] = run_steps(net, engine, rows)
            results[(mode, name)]["ledger"] = engine.ledger.state_dict()
    return results


def agreement(rank: int) -> dict:
    """A failure on one rank stops the step on every rank; different seeds are refused."""
    out: dict = {}
    try:
        pg.DPEngine(model(), 1.0, max_grad_norm=1.0, expected_batch_size=4.0, seed=rank)
        out["seeds"] = "accepted"
    except ValueError as e:
        out["seeds"] = str(e)
    net = model()
    engine = pg.DPEngine(net, 0.0, clipping=rule("flat"), expected_batch_size=GLOBAL_B, seed=3)
    x, y = data(0)
    x, y = x[rank::2].clone(), y[rank::2]
    if rank == 1:
        x[0, 0, 0] = float("nan")
    try:
        engine.accumulate(F.cross_entropy(net(x), y, reduction="none"))
    except pg.NonFiniteGradientError:
        out["accumulate"] = "raised"
    try:
        engine.step()
        out["step"] = "taken"
    except pg.GradientStateError as e:
        out["step"] = str(e)
    out["grad_after_failure"] = [p.grad for p in net.parameters()]
    out["steps_after_failure"] = engine.steps
    x, y = data(1)  # the ranks carry on in step with each other
    engine.backward(F.cross_entropy(net(x[rank::2]), y[rank::2], reduction="none"))
    out["next"] = {n: p.grad.clone() for n, p in net.named_parameters()}
    return out


def _outcome(build) -> object:
    """``"accepted"``, or ``(PrivgradError subclass name, message)``, or the foreign error."""
    try:
        build()
        return "accepted"
    except pg.PrivgradError as e:
        return (type(e).__name__, str(e))
    except Exception as e:  # recorded, so that the test names what was raised instead
        return ("not a PrivgradError", repr(e))


LAYERS = {"0": 1.9, "3": 3.4, "4": 0.5, "5": 2.3}
SWAPPED = {"0": 2.3, "3": 3.4, "4": 0.5, "5": 1.9}  # the same sensitivity, other groups' C
BASE = {"noise_multiplier": 1.0, "expected_batch_size": 16.0, "sample_rate": 0.01, "seed": 3}
CONSTRUCTION = {  # case: (both ranks' arguments, what rank 1 passes instead)
    "same": ({"max_grad_norm": 1.0}, {}),
    "mode only": ({"max_grad_norm": 1.0}, {"mode": "vmap"}),  # performance only
    "C": ({"max_grad_norm": 1.0}, {"max_grad_norm": 2.0}),
    "sigma": ({"max_grad_norm": 1.0}, {"noise_multiplier": 1.1}),
    "q": ({"max_grad_norm": 1.0}, {"sample_rate": 0.02}),
    "q None": ({"max_grad_norm": 1.0}, {"sample_rate": None}),
    "expected_batch_size": ({"max_grad_norm": 1.0}, {"expected_batch_size": 17.0}),
    "PerLayer thresholds": ({"clipping": pg.clipping.PerLayer(LAYERS)},
                            {"clipping": pg.clipping.PerLayer(SWAPPED)}),
    "rule": ({"clipping": pg.clipping.Flat(1.0)}, {"clipping": pg.clipping.Automatic(1.0)}),
    "Adaptive count noise": (
        {"clipping": pg.clipping.Adaptive(initial_max_norm=1.0, count_noise_multiplier=2.0)},
        {"clipping": pg.clipping.Adaptive(initial_max_norm=1.0, count_noise_multiplier=3.0)}),
}


def construction_agreement(rank: int) -> dict:
    """Each case built on both ranks, rank 1 with one setting changed."""
    out = {}
    for case, (common, changed) in CONSTRUCTION.items():
        kwargs = {**BASE, **common, **(changed if rank == 1 else {})}
        out[case] = _outcome(lambda kwargs=kwargs: pg.DPEngine(model(), **kwargs))
    return out


def _adaptive_c(engine: pg.DPEngine, factor: float) -> None:
    state = engine.state_dict()  # a restore on one rank only, with another current C
    state["max_grad_norm"] *= factor
    engine.load_state_dict(state)


STEP_CHANGES = {  # case: (clipping, change on rank 1, undo on rank 1)
    "sigma": (None, lambda e: setattr(e, "noise_multiplier", 1.3),
              lambda e: setattr(e, "noise_multiplier", 1.0)),
    "q": (None, lambda e: setattr(e, "sample_rate", 0.02),
          lambda e: setattr(e, "sample_rate", 0.01)),
    "expected_batch_size": (None, lambda e: setattr(e, "expected_batch_size", 17.0),
                            lambda e: setattr(e, "expected_batch_size", 16.0)),
    "C": (None, lambda e: setattr(e, "max_grad_norm", 2.0),
          lambda e: setattr(e, "max_grad_norm", 1.0)),
    "PerLayer thresholds": (
        pg.clipping.PerLayer(LAYERS), lambda e: setattr(e, "clipping", pg.clipping.PerLayer(
            SWAPPED)), lambda e: setattr(e, "clipping", pg.clipping.PerLayer(LAYERS))),
    "Adaptive current C": (pg.clipping.Adaptive(initial_max_norm=1.0),
                           lambda e: _adaptive_c(e, 2.0), lambda e: _adaptive_c(e, 0.5)),
    "trainable parameters": (None, lambda e: e.model[5].bias.requires_grad_(False),
                             lambda e: e.model[5].bias.requires_grad_(True)),
}


def step_agreement(rank: int) -> dict:
    """One good step, a change on rank 1 only, a refused step, the change undone, a step.

    A case whose change does not exist in this version (``engine.max_grad_norm = x``
    raises ``AttributeError``, or setting ``engine.clipping`` does not change the plan)
    is recorded as skipped by every rank alike (both probe it; only rank 1 keeps it).
    """
    out: dict = {}
    for case, (clipping, change, undo) in STEP_CHANGES.items():
        net = model()
        kwargs = {**BASE, **({"clipping": clipping} if clipping else {"max_grad_norm": 1.0})}
        engine = pg.DPEngine(net, **kwargs)
        x, y = data(0)
        x, y = x[rank::2], y[rank::2]

        def step(engine=engine, net=net, x=x, y=y) -> pg.StepTrace:
            for p in net.parameters():
                p.grad = None
            return engine.backward(F.cross_entropy(net(x), y, reduction="none"))

        step()
        plan, sensitivity = engine.plan, engine.max_grad_norm
        try:
            change(engine)  # every rank probes the change, so the skip is collective
        except AttributeError as e:
            out[case] = ("skipped", f"{type(engine).__name__} has no setter for it: {e}")
            continue
        if case == "PerLayer thresholds" and engine.plan == plan:
            out[case] = ("skipped", "setting engine.clipping does not rebind the plan")
            continue
        if rank == 0:
            undo(engine)
        ledger, steps = engine.ledger.state_dict(), engine.steps
        refused = _outcome(step)
        result = {"refused": refused, "ledger_unchanged": engine.ledger.state_dict() == ledger,
                  "steps": (steps, engine.steps),
                  "grads_none": all(p.grad is None for p in net.parameters()),
                  "C": sensitivity}
        if rank == 1:
            undo(engine)
        trace = step()
        result["after"] = (trace.batch_size, len(x), engine.steps,
                           engine.ledger.state_dict() != ledger)
        out[case] = result
    return out


def sensitivity(rank: int) -> dict:
    """Global clipped sums with rank 1's first sample present, removed, or made adversarial.

    σ = 0 and every sample's gradient points the same way: loss ``k_i·(w·x + b)`` with one
    ``x`` of norm 0.75, so the gradient ``k_i·(x, 1)`` has norm ``1.25·k_i`` (weight
    ``0.75·k_i``, bias ``k_i``). Rank 1's first sample sits just above the threshold
    (``1.001·C`` in every group: a rule that clipped only above ``1.01·C`` would let it
    through), the others are huge (``k`` from 1e3 to 8e3). Every clipped contribution is
    then the same vector of norm S: removing that sample moves the sum by exactly S,
    replacing it by its negation by 2S. Each rank's samples come in two physical batches.
    ``"mismatched C"``: rank 1 clips at twice rank 0's ``C``.
    """
    rules = {"flat": (pg.clipping.Flat(1.5),) * 2,  # S = 1.5
             "per-layer": (pg.clipping.PerLayer({"weight": 1.2, "bias": 1.6}),) * 2,  # S = 2
             "mismatched C": (pg.clipping.Flat(1.5), pg.clipping.Flat(3.0))}
    x = torch.tensor([0.375, -0.375, 0.375, 0.375], dtype=torch.float64).expand(4, 4).clone()
    out: dict = {}
    for name, per_rank in rules.items():
        for mode in MODES:
            torch.manual_seed(0)
            net = nn.Linear(4, 1).double()
            scale = 1e3 * (1 + torch.arange(4, dtype=torch.float64) + 4 * rank)
            if rank == 1:  # gradient norm 1.25·k = 1.001·S for the S rank 0 reports
                scale[0] = 1.001 * (2.0 if name == "per-layer" else 1.5) / 1.25
            try:
                engine = pg.DPEngine(net, 0.0, clipping=per_rank[rank], expected_batch_size=8.0,
                                     mode=mode, seed=0)
            except pg.PrivgradError as e:
                out[(name, mode)] = {"refused": str(e)}
                continue

            def clipped_sum(xs, sign, engine=engine, net=net) -> dict:
                for p in net.parameters():
                    p.grad = None
                half = len(xs) // 2
                for part in (slice(None, half), slice(half, None)):
                    engine.accumulate(sign[part] * net(xs[part]).squeeze(1))
                return {n: t.clone() for n, t in engine.step().clipped_sum.items()}

            adversarial = scale.clone()
            adversarial[0] *= -1.0 if rank == 1 else 1.0
            keep = slice(1, None) if rank == 1 else slice(None)
            out[(name, mode)] = {
                "S": engine.max_grad_norm,
                "full": clipped_sum(x, scale),
                "removed": clipped_sum(x[keep], scale[keep]),
                "replaced": clipped_sum(x, adversarial),
            }
    return out


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a rank left waiting by a bug fails the test in a minute instead of gloo's 30
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        result: dict = {"scenarios": scenarios(rank, world)}
        # DDP-wrapped: same result as the plain model, and no DDP reduction runs
        net = nn.parallel.DistributedDataParallel(model())
        engine = pg.DPEngine(net, 0.0, clipping=rule("flat"), expected_batch_size=GLOBAL_B,
                             seed=3)
        result["ddp"] = run_steps(net, engine, slice(rank, None, world))
        result["ddp_sync_off"] = net.require_backward_grad_sync is False  # unwrap switched it
        # an empty batch on one rank: the other rank's samples only
        net = model()
        engine = pg.DPEngine(net, 0.0, clipping=rule("flat"), expected_batch_size=GLOBAL_B,
                             seed=3)
        x, y = data(0)
        if rank == 0:
            engine.accumulate(F.cross_entropy(net(x), y, reduction="none"))
        engine.step()
        result["empty"] = {n: p.grad.clone() for n, p in net.named_parameters()}
        # bucketed all-reduce: one call for the whole model; many small buckets also sum right
        calls: list[int] = []
        real = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return real(tensor, *args, **kwargs)

        dist.all_reduce = counting
        try:
            net = model()
            engine = pg.DPEngine(net, 0.0, max_grad_norm=0.5, expected_batch_size=GLOBAL_B)
            x, y = data(0)
            engine.backward(F.cross_entropy(net(x[rank::world]), y[rank::world],
                                            reduction="none"))
            result["all_reduce_sizes"] = calls
            result["parameters"] = sum(p.numel() for p in net.parameters())
        finally:
            dist.all_reduce = real
        parts = {"a": torch.full((5,), rank + 1.0), "b": torch.full((3, 7), 2.0 * rank,
                 dtype=torch.float64), "c": torch.ones(40)}
        result["buckets"] = distributed.all_reduce_sum(parts, bucket_bytes=64)
        # σ > 0 with secure noise: every rank holds the same noise and the same p.grad
        torch.manual_seed(rank)  # different data and init per rank on purpose
        big = nn.Linear(400, 300, bias=False).double()
        if rank == 1:
            with torch.no_grad():
                big.weight.copy_(torch.zeros_like(big.weight))  # replicas equal only via DDP
        dist.broadcast(big.weight.data, src=0)
        engine = pg.DPEngine(big, 1.5, max_grad_norm=0.7, expected_batch_size=8.0)
        noisy = []
        for _ in range(2):
            big.weight.grad = None
            trace = engine.backward(big(torch.randn(4, 400, dtype=torch.float64)).sum(1))
            noisy.append({"grad": big.weight.grad.clone(), "noise": trace.noise["weight"],
                          "clipped_sum": trace.clipped_sum["weight"]})
        result["noisy"] = noisy
        result["agreement"] = agreement(rank)
        result["construction"] = construction_agreement(rank)
        result["step_changes"] = step_agreement(rank)
        result["sensitivity"] = sensitivity(rank)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
