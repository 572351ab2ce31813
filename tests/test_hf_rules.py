"""Hugging Face's own layer classes get exact rules: GPT-2's ``Conv1D``, Llama/Qwen2/Mistral
RMSNorm. Oracle: the float64 batch-size-1 loop on random-init models built from configs."""

import pytest
import torch
import torch.nn.functional as F

import privgrad as pg
from oracle import assert_close

transformers = pytest.importorskip("transformers")

B, T, V = 4, 6, 50


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=V, n_positions=T,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   vocab_size=V, max_position_embeddings=T)
    return transformers.LlamaForCausalLM(cfg)


def qwen2():
    cfg = transformers.Qwen2Config(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   vocab_size=V, max_position_embeddings=T)
    return transformers.Qwen2ForCausalLM(cfg)


def per_sample_loss(model, ids):
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    logits = model(ids, position_ids=positions).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


@pytest.mark.parametrize(("build", "cls"), [(gpt2, "Conv1D"), (llama, "LlamaRMSNorm"),
                                            (qwen2, "Qwen2RMSNorm")])
@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize"])
def test_hf_layers_use_their_rule_and_match_the_loop(build, cls, mode):
    torch.manual_seed(0)
    model = build().double().eval()
    ruled = [m for m in model.modules() if type(m).__name__ == cls]
    assert ruled and all(pg.per_sample.lookup(m) is not None for m in ruled)
    ids = torch.randint(0, V, (B, T))
    params = dict(model.named_parameters())
    rows = [torch.autograd.grad(per_sample_loss(model, ids[i:i + 1])[0], list(params.values()),
                                allow_unused=True) for i in range(B)]
    want = {n: torch.stack([torch.zeros_like(p) if r[k] is None else r[k] for r in rows])
            for k, (n, p) in enumerate(params.items())}
    engine = pg.DPEngine(model, noise_multiplier=0.0, max_grad_norm=1e9, expected_batch_size=B,
                         mode=mode)
    trace = engine.backward(per_sample_loss(model, ids), keep="pre_clip")
    got = trace.per_sample_grads()
    assert_close({n: got[n] for n in want}, want)
    norms = torch.stack([g.flatten(1).square().sum(1) for g in want.values()]).sum(0).sqrt()
    torch.testing.assert_close(trace.norms, norms)
