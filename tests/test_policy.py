"""``mode="auto"`` picks its formulas from the shapes alone: the same bits in every run.

No timing decides and nothing is cached between engines, so two engines in one process
(one of them first run on other shapes) and a fresh process write the same ``p.grad``.
"""

import subprocess
import sys
import textwrap

import torch
from torch import nn

from privgrad.per_sample import policy
from privgrad.per_sample.rule import Formula

STEP = textwrap.dedent("""
    import hashlib
    import torch
    from torch import nn
    import privgrad as pg

    def digest(warm_up_first):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(64 * 8 * 8, 10))
        if warm_up_first:  # another engine, other shapes, in the same process
            other = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Flatten(),
                                  nn.Linear(32 * 16 * 16, 3))
            e = pg.DPEngine(other, noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=16, seed=1)
            e.backward(other(torch.randn(16, 3, 16, 16)).square().sum(1))
            e.close()
        engine = pg.DPEngine(model, noise_multiplier=1.0, max_grad_norm=0.5,
                             expected_batch_size=48, seed=7)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(48, 3, 8, 8, generator=g)
        engine.backward(model(x).square().sum(1))
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.grad.numpy().tobytes())
        return h.hexdigest()
""")


def test_auto_writes_the_same_bits_in_two_engines_and_in_a_fresh_process():
    scope: dict = {}
    exec(STEP, scope)
    here = scope["digest"](False)
    assert scope["digest"](True) == here
    threads = f"torch.set_num_threads({torch.get_num_threads()})\n"  # a BLAS splits by threads
    out = subprocess.run([sys.executable, "-c", STEP + threads + "print(digest(False))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_the_fewest_flops_win_and_ties_go_to_the_first_listed():
    def f(flops: int, ghost: bool) -> Formula:
        return Formula(lambda s: torch.zeros(0), flops, 1, ghost)

    assert policy.choose({"a": f(5, True), "b": f(3, False)}) == "b"
    assert policy.choose({"a": f(3, True), "b": f(3, False)}) == "a"


def test_a_policy_choice_does_not_depend_on_the_batch_size():
    """Costs are per sample: Poisson batches of any size get the same formula."""
    from privgrad.per_sample.rules import conv

    m = nn.Conv2d(64, 64, 3, padding=1)
    picks = set()
    for B in (1, 7, 64, 300):
        A = torch.randn(B, 64, 8, 8)
        picks.add(policy.choose(conv.norm_formulas(m, A, torch.randn(B, 64, 8, 8))["weight"]))
    assert len(picks) == 1
