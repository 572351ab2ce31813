"""``privgrad.hf.DPTrainer``: DP-SGD inside Hugging Face's Trainer, accounted and resumable.

Random-init tiny GPT-2 (with and without PEFT LoRA) and BERT classifiers on generated data.
Oracles: ``pg.accounting.epsilon`` computed directly for the ledger's ε, the models' own
``labels=`` loss on one example for the per-example losses, an uninterrupted run for a
resumed one.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import privgrad as pg

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from privgrad.hf import (  # noqa: E402
    BudgetSpentError,
    DPTrainer,
    PrivacyArguments,
    per_example_losses,
    steps_within,
)

T, V, N = 12, 40, 96


class Sequences(torch.utils.data.Dataset):
    """Random token sequences of random lengths, padded; labels -100 on the padding."""

    def __init__(self, n: int = N, classes: int | None = None, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, V, (n, T), generator=g)
        self.lengths = torch.randint(3, T + 1, (n,), generator=g)
        self.classes = None if classes is None else torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = (torch.arange(T) < self.lengths[i]).long()
        ids = self.ids[i] * mask
        labels = self.classes[i] if self.classes is not None else ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def gpt2(lora: bool = False):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=V, n_positions=T, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0))
    return model


def bert_classifier(classes: int = 3):
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        vocab_size=V, max_position_embeddings=T, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=classes))


def training_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8,
                gradient_accumulation_steps=2, max_steps=4, logging_steps=1,
                learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                disable_tqdm=True, seed=0)
    return transformers.TrainingArguments(**(base | kw))


def trainer(model, out, dataset=None, privacy=None, **kw):
    return DPTrainer(model=model, args=training_args(out, **kw),
                     train_dataset=dataset if dataset is not None else Sequences(),
                     data_collator=transformers.default_data_collator,
                     privacy_args=privacy or PrivacyArguments(noise_multiplier=1.0, delta=1e-3,
                                                              seed=0))


def test_lora_gpt2_trains_only_the_adapters_and_states_the_ledgers_epsilon(tmp_path):
    model = gpt2(lora=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = trainer(model, tmp_path)
    assert tr.args.max_grad_norm == 0.0 and tr.args.gradient_accumulation_steps == 1
    tr.train()
    assert tr.engine.steps == 4 and tr.logical_batch_size == 16
    q = 16 / N
    assert tr.sample_rate == q
    want = pg.accounting.epsilon(1.0, q, 4, delta=1e-3)
    assert tr.engine.epsilon(1e-3) == pytest.approx(want, rel=1e-12)
    logged = [h["epsilon"] for h in tr.state.log_history if "epsilon" in h]
    assert logged[-1] == pytest.approx(want, rel=1e-12)
    assert logged == sorted(logged) and len(logged) >= 4
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()
               if not p.requires_grad)
    tr.save_model()
    statement = json.loads((tmp_path / "privacy.json").read_text())
    assert statement["steps"] == 4 and statement["sample_rate"]["max"] == q
    assert os.path.isfile(tmp_path / "privgrad_state.pt")


def test_a_target_epsilon_calibrates_sigma_to_the_planned_steps(tmp_path):
    tr = trainer(gpt2(lora=True), tmp_path,
                 privacy=PrivacyArguments(target_epsilon=2.0, delta=1e-3, seed=0))
    sigma = pg.accounting.calibrate_noise(2.0, 1e-3, 16 / N, steps=4)
    assert tr.engine.noise_multiplier == sigma and tr.allowed_steps == 4
    tr.train()
    assert tr.engine.epsilon(1e-3) <= 2.0
    assert tr.engine.epsilon(1e-3) == pytest.approx(
        pg.accounting.epsilon(sigma, 16 / N, 4, delta=1e-3), rel=1e-12)


def test_training_stops_before_the_step_that_would_exceed_the_target(tmp_path):
    privacy = PrivacyArguments(noise_multiplier=1.0, target_epsilon=1.5, delta=1e-3, seed=0)
    tr = trainer(bert_classifier(), tmp_path, Sequences(classes=3), privacy, max_steps=50)
    q = 16 / N
    allowed = tr.allowed_steps
    assert pg.accounting.epsilon(1.0, q, allowed, delta=1e-3) <= 1.5
    assert pg.accounting.epsilon(1.0, q, allowed + 1, delta=1e-3) > 1.5
    assert allowed < 50
    tr.train()
    assert tr.engine.steps == allowed and tr.engine.epsilon(1e-3) <= 1.5
    with pytest.raises(BudgetSpentError, match="would exceed target_epsilon"):
        tr.training_step(tr.model, {})
    assert tr.engine.steps == allowed


def test_steps_within_is_the_largest_count_within_the_budget():
    for sigma, q, target in ((1.0, 0.01, 1.0), (0.7, 0.1, 4.0), (3.0, 0.001, 0.05)):
        k = steps_within(sigma, q, target, 1e-5, "pld")
        assert pg.accounting.epsilon(sigma, q, k, delta=1e-5) <= target
        assert pg.accounting.epsilon(sigma, q, k + 1, delta=1e-5) > target


def test_full_fine_tuning_of_bert_trains_its_position_embeddings(tmp_path):
    model = bert_classifier()
    pos = model.bert.embeddings.position_embeddings.weight
    before = pos.detach().clone()
    trainer(model, tmp_path, Sequences(classes=3)).train()
    assert not torch.equal(pos, before)


def test_empty_poisson_batches_release_pure_noise_steps(tmp_path):
    tr = trainer(gpt2(lora=True), tmp_path, Sequences(n=200), per_device_train_batch_size=1,
                 gradient_accumulation_steps=1, max_steps=8)
    sizes = []
    real_step = tr.engine.step

    def counting_step():
        trace = real_step()
        sizes.append(trace.batch_size)
        return trace

    tr.engine.step = counting_step
    tr.train()
    assert tr.engine.steps == 8 and 0 in sizes  # q = 1/200: several empty batches


@pytest.mark.parametrize("build", [lambda: gpt2(), lambda: bert_classifier()])
def test_per_example_losses_equal_the_models_own_loss_on_each_example(build):
    model = build().double().eval()
    classes = None if isinstance(model, transformers.GPT2LMHeadModel) else 3
    batch = transformers.default_data_collator([Sequences(8, classes)[i] for i in range(8)])
    causal = classes is None
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = per_example_losses(logits, batch["labels"], "causal_lm" if causal else "classification")
    for i in range(8):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        torch.testing.assert_close(got[i].float(), model(**one).loss.float())  # HF: float32


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    def run(out, steps, resume=None):
        tr = trainer(gpt2(lora=True), out, max_steps=4, save_strategy="steps", save_steps=2)
        if steps < 4:
            tr.args.max_steps = steps
        tr.train(resume_from_checkpoint=resume)
        return tr

    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 4)  # writes checkpoint-2 and checkpoint-4
    resumed = run(tmp_path / "b", 4, resume=str(tmp_path / "b" / "checkpoint-2"))
    assert resumed.engine.steps == 4
    assert resumed.engine.epsilon(1e-3) == full.engine.epsilon(1e-3)
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_a_checkpoint_without_the_privacy_state_is_refused(tmp_path):
    tr = trainer(gpt2(lora=True), tmp_path, save_strategy="steps", save_steps=2)
    tr.train()
    os.remove(tmp_path / "checkpoint-2" / "privgrad_state.pt")
    again = trainer(gpt2(lora=True), tmp_path)
    with pytest.raises(FileNotFoundError, match="ledger"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert again.engine.steps == 0


def test_bad_privacy_settings_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="target_epsilon"):
        PrivacyArguments()
    with pytest.raises(ValueError, match="not below 1/N"):
        trainer(gpt2(lora=True), tmp_path, privacy=PrivacyArguments(noise_multiplier=1.0,
                                                                    delta=0.05))
    with pytest.raises(ValueError, match="logical batch"):
        trainer(gpt2(lora=True), tmp_path, per_device_train_batch_size=64,
                gradient_accumulation_steps=2)
