"""Benchmark models and their random data.

Three models, each with a per-sample loss function returning shape ``(B,)``:

- ``mlp``: 784 → 512 → 256 → 10 on flattened 28×28 inputs.
- ``cnn``: 4 × (Conv2d + GroupNorm + ReLU), 3 max-pools, global average pool, Linear,
  on 32×32×3 inputs (no BatchNorm).
- ``transformer``: a small causal language model (vocabulary 2000, T = 64, d = 128,
  2 pre-LN blocks of attention built from ``nn.Linear`` with a manual causal softmax, and an
  MLP). The per-sample loss is the mean over positions of the next-token cross-entropy.

Everything here is plain ``torch.nn`` so that privgrad, Opacus ``GradSampleModule`` and
Opacus ``GradSampleModuleFastGradientClipping`` can all handle it: no buffers (the causal
mask is a plain tensor attribute, not a registered buffer), and every layer sees batch-first
inputs (the position indices are expanded to ``(B, T)`` before ``nn.Embedding``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 2000
SEQ_LEN = 64
D_MODEL = 128
N_HEADS = 4
N_BLOCKS = 2


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 512)
        self.fc2 = nn.Linear(512, 256)
        self.fc3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        chans = [3, 32, 64, 64, 128]
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, kernel_size=3, padding=1)
            for cin, cout in zip(chans[:-1], chans[1:], strict=True)
        )
        self.norms = nn.ModuleList(nn.GroupNorm(min(16, c), c) for c in chans[1:])
        self.fc = nn.Linear(chans[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = F.relu(norm(conv(x)))
            if i < 3:
                x = F.max_pool2d(x, 2)  # 32 → 16 → 8 → 4
        return self.fc(x.mean(dim=(2, 3)))


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, h, d // h).transpose(1, 2)  # (B, h, T, d/h)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)  # (B, h, T, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        att = scores.softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, d)
        return self.out(y)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Embedding(SEQ_LEN, D_MODEL)
        self.blocks = nn.ModuleList(Block(D_MODEL, N_HEADS) for _ in range(N_BLOCKS))
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        # Batch-first positions, (B, T): Opacus computes per-sample gradients from each
        # layer's input and needs the batch dimension there. Contiguous, because Opacus
        # 1.6 ghost clipping's embedding norm sampler calls ``input_ids.view(-1, 1)``,
        # which fails on an expanded (stride-0) tensor.
        pos = torch.arange(T, device=idx.device).expand(B, T).contiguous()
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, VOCAB)


def classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    B, T, V = logits.shape
    tok = F.cross_entropy(logits.reshape(B * T, V), y.reshape(B * T), reduction="none")
    return tok.view(B, T).mean(dim=1)


@dataclass(frozen=True)
class Spec:
    """A benchmark model: constructor, random batch maker and per-sample loss."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # → (B,)
    description: str


def _mlp_batch(B: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(B, 1, 28, 28, generator=g), torch.randint(0, 10, (B,), generator=g)


def _cnn_batch(B: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g)


def _lm_batch(B: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (B, SEQ_LEN + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


SPECS: dict[str, Spec] = {
    "mlp": Spec("mlp", MLP, _mlp_batch, classification_loss,
                "MLP 784→512→256→10, 28×28 inputs"),
    "cnn": Spec("cnn", CNN, _cnn_batch, classification_loss,
                "CNN 4×(Conv3×3+GroupNorm+ReLU) 32-64-64-128 ch, 3 max-pools, Linear; 32×32×3"),
    "transformer": Spec(
        "transformer", TinyGPT, _lm_batch, lm_loss,
        f"causal transformer, vocab {VOCAB}, T={SEQ_LEN}, d={D_MODEL}, {N_HEADS} heads, "
        f"{N_BLOCKS} blocks (attention from nn.Linear, manual causal softmax)",
    ),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
