"""Ids shared by all samples (position ids ``(1, T)`` or ``(T,)``) just work, in every mode.

Models are called exactly as their authors call them — Hugging Face models with
``model(input_ids, attention_mask=...)`` and no ``position_ids``, nanoGPT with
``wpe(torch.arange(T))`` — with every parameter trained, position embeddings included.
Oracle: the float64 batch-size-1 loop. The sensitivity bound is checked on the clipped sum.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import privgrad as pg
from oracle import assert_close

B, T, V = 4, 6, 50
MODES = ["auto", "ghost", "materialize", "vmap"]


class NanoGPT(nn.Module):
    """nanoGPT's embedding: ``wte(idx) + wpe(arange(T))``, the latter ``(T, d)``."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, 8), nn.Embedding(T, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.block(self.wte(idx) + self.wpe(pos)))


class SingletonPositions(nn.Module):
    """Position ids from a registered ``(1, max)`` buffer, as DistilBERT and BERT slice it."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, 8), nn.Embedding(T, 8)
        self.register_buffer("position_ids", torch.arange(T).unsqueeze(0), persistent=False)
        self.head = nn.Linear(8, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos(self.position_ids[:, : idx.shape[1]])
        return self.head(torch.tanh(h))


def lm_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def hf_models():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=T, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0))
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        vocab_size=V, max_position_embeddings=T, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    distilbert = transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
        n_layers=1, dim=16, hidden_dim=32, n_heads=2, vocab_size=V, max_position_embeddings=T,
        dropout=0.0, attention_dropout=0.0))
    return {"gpt2": gpt2, "bert": bert, "distilbert": distilbert}


def call(name: str, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if name in ("nanogpt", "singleton"):
        return lm_losses(model(ids), ids)
    mask = torch.ones_like(ids)
    return lm_losses(model(ids, attention_mask=mask).logits, ids)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "nanogpt":
        return NanoGPT()
    if name == "singleton":
        return SingletonPositions()
    return hf_models()[name]


NAMES = ["nanogpt", "singleton", "gpt2", "bert", "distilbert"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_shared_position_ids_give_exact_per_sample_gradients(name, mode):
    model = build(name).double().eval()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = [torch.autograd.grad(call(name, model, ids[i:i + 1])[0], list(params.values()),
                                allow_unused=True) for i in range(B)]
    want = {n: torch.stack([torch.zeros_like(p) if r[k] is None else r[k] for r in rows])
            for k, (n, p) in enumerate(params.items())}
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=1e9, expected_batch_size=B,
                         mode=mode)
    try:
        trace = engine.backward(call(name, model, ids), keep="pre_clip")
        got = trace.per_sample_grads()
    finally:
        engine.close()
    assert_close({n: got[n] for n in want}, want)
    assert any(want[n].flatten(1).norm(dim=1).min() > 0 for n in want if "wpe" in n or "pos" in n)


@pytest.mark.parametrize("name", ["nanogpt", "gpt2"])
def test_removing_one_sample_moves_the_clipped_sum_by_at_most_c(name):
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))

    def clipped(batch):
        model = build(name).double().eval()
        engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=0.01,
                             expected_batch_size=1.0)
        try:
            cs = engine.backward(call(name, model, batch)).clipped_sum
            return torch.cat([v.flatten() for v in cs.values()])
        finally:
            engine.close()

    full = clipped(ids)
    for j in range(B):
        rest = clipped(torch.cat([ids[:j], ids[j + 1:]]))
        assert float((full - rest).norm()) <= 0.01 * (1 + 1e-9)


def test_the_model_computes_what_it_computes_without_the_engine():
    model = build("gpt2").eval()
    ids = torch.randint(0, V, (B, T))
    before = model(ids).logits
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=B)
    try:
        torch.testing.assert_close(model(ids).logits, before)
    finally:
        engine.close()
