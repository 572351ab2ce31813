"""Work done by each spawned rank of tests/test_distributed.py (gloo on CPU)."""

from __future__ import annotations

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


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
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
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
