"""DP LoRA fine-tuning of a small causal LM with Hugging Face's Trainer, offline.

The pipeline DP fine-tuning is made for, in miniature: a small GPT-2 (built from a
config, nothing downloaded) is first pre-trained without privacy on public text — the
docstrings of some standard-library modules, bytes as tokens — and then its LoRA
adapters are fine-tuned with ``privgrad.hf.DPTrainer`` to (ε = 8, δ = 1e-5)-DP on
"private" text of another kind: the Python source code of other modules. Run it with
``.venv/bin/python examples/hf_lora.py`` (about a minute on 2 CPU cores); ``--steps 5``
for a quick look.
"""

import argparse
import importlib
import inspect

import peft
import torch
import transformers

from privgrad.hf import DPTrainer, PrivacyArguments

T = 64  # bytes per example
PUBLIC = ["argparse", "collections", "dataclasses", "functools", "itertools", "logging", "os",
          "pathlib", "string", "subprocess", "threading", "typing", "unittest"]
PRIVATE = ["csv", "json.encoder", "json.decoder", "textwrap", "shutil", "fnmatch", "glob"]


def source_code(names: list[str]) -> list[str]:
    """The source of the modules, one text per blank-line-separated block."""
    blocks = (b.strip() for n in names for b in
              inspect.getsource(importlib.import_module(n)).split("\n\n"))
    return sorted({b for b in blocks if len(b) > 40})


def docstrings(names: list[str]) -> list[str]:
    """The docstrings of the modules and of their public functions and classes."""
    out = []
    for name in names:
        module = importlib.import_module(name)
        for obj in (module, *(v for k, v in vars(module).items() if not k.startswith("_"))):
            doc = inspect.getdoc(obj) if callable(obj) or obj is module else None
            if doc and len(doc) > 40:
                out.append(doc)
    return sorted(set(out))


class ByteChunks(torch.utils.data.Dataset):
    """Each example: ``T`` bytes of one docstring, padded; padding labelled -100."""

    def __init__(self, texts: list[str]) -> None:
        data = [t.encode()[i:i + T] for t in texts for i in range(0, len(t.encode()), T)]
        self.chunks = [c for c in data if len(c) >= 16]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        b = torch.tensor(list(self.chunks[i]))
        pad = T - len(b)
        ids = torch.cat([b, torch.zeros(pad, dtype=torch.long)])
        mask = (torch.arange(T) < len(b)).long()
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pretrain(model: transformers.PreTrainedModel, public: ByteChunks, steps: int) -> None:
    """Plain (non-private) training on public text: what a downloaded checkpoint would be."""
    args = transformers.TrainingArguments(
        output_dir="runs/hf_lora_public", per_device_train_batch_size=32, max_steps=steps,
        learning_rate=3e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=public,
                         data_collator=transformers.default_data_collator).train()


def main() -> None:
    """Pre-trains on public text, then DP-fine-tunes the LoRA adapters on private text."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="DP steps")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--out", default="runs/hf_lora")
    opts = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256,
                                     n_positions=T, bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(config)
    pretrain(base, ByteChunks(docstrings(PUBLIC)), opts.pretrain_steps)
    texts = source_code(PRIVATE)
    train = ByteChunks(texts[: len(texts) * 9 // 10])
    held_out = ByteChunks(texts[len(texts) * 9 // 10:])  # never trained on: the eval set
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
        lora_dropout=0.0))
    args = transformers.TrainingArguments(
        output_dir=opts.out, per_device_train_batch_size=64, gradient_accumulation_steps=2,
        max_steps=opts.steps, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=max(1, opts.steps // 6), save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0)
    trainer = DPTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                        data_collator=transformers.default_data_collator,
                        privacy_args=PrivacyArguments(target_epsilon=8.0, delta=1e-5,
                                                      max_grad_norm=1.0))
    print(f"{len(train)} private training examples, logical batch "
          f"{trainer.logical_batch_size} (q = {trainer.sample_rate:.4f}), "
          f"σ = {trainer.engine.noise_multiplier:.3f}")
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model()  # adapters, privacy.json and the privacy state
    print(f"held-out private loss per byte: {before:.3f} before, {after:.3f} after")
    print(f"ε = {trainer.engine.epsilon(1e-5):.3f} at δ = 1e-5 after {trainer.engine.steps} steps")


if __name__ == "__main__":
    main()
