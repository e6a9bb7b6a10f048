"""fastopt inside the real transformers.Trainer: train, save, resume_from_checkpoint, and compare
with an uninterrupted run -- for AdamW, Lion, AdamW8bit and an N:M sparse Lion.  The Trainer loads the
optimizer's state with torch.load(weights_only=True), so this is also the weights-only test in real use.
A tiny Llama built from a config in code (no download; HF_HUB_OFFLINE=1)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import fastopt  # noqa: E402
from fastopt.sparse import NMSparsity, nm_param_groups  # noqa: E402

STEPS, SAVE_AT = 6, 3

OPTIMIZERS = {
    "AdamW": lambda m: fastopt.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01, backend="cpu"),
    "Lion": lambda m: fastopt.Lion(m.parameters(), lr=1e-4, weight_decay=0.1, backend="cpu"),
    # hidden 64: the attention (64x64) and MLP (128x64) weights quantize (>= min_quant_size 4096 elements)
    "AdamW8bit": lambda m: fastopt.lowbit.AdamW8bit(m.parameters(), lr=1e-3, backend="cpu"),
    "Lion-nm-sparse": lambda m: fastopt.Lion(
        nm_param_groups(m, NMSparsity(2, 4), filter=lambda name, mod: "lm_head" not in name),
        lr=1e-4, backend="cpu"),
}


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                                      attention_dropout=0.0, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 64, (16,), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}


class _FastoptTrainer(transformers.Trainer):
    def __init__(self, *args, make_optimizer, **kwargs):
        self._make_optimizer = make_optimizer
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):   # the Trainer's documented hook for a custom optimizer
        if self.optimizer is None:
            self.optimizer = self._make_optimizer(model if model is not None else self.model)
        return self.optimizer


def _trainer(out, make_optimizer):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, save_steps=SAVE_AT, save_strategy="steps", per_device_train_batch_size=4,
        learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, report_to=[],
        use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return _FastoptTrainer(model=_model(), args=args, train_dataset=_Data(), make_optimizer=make_optimizer)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trainer_resume_from_checkpoint_is_bit_exact(name, tmp_path):
    make = OPTIMIZERS[name]
    whole = _trainer(tmp_path / "whole", make)
    whole.train()
    assert type(whole.optimizer.optimizer if hasattr(whole.optimizer, "optimizer") else whole.optimizer).__module__ \
        .startswith("fastopt")
    ckpt = tmp_path / "whole" / f"checkpoint-{SAVE_AT}"
    assert (ckpt / "optimizer.pt").exists()

    resumed = _trainer(tmp_path / "resumed", make)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == STEPS
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{name}: {k} differs between the uninterrupted and the resumed run"
    moved = _model().state_dict()
    assert any(not torch.equal(moved[k], a[k]) for k in a), f"{name}: training changed nothing"
    if name == "Lion-nm-sparse":
        w = a["model.layers.0.mlp.up_proj.weight"]
        assert fastopt.sparse.is_nm_sparse(w, 2, 4)
    # the losses logged after the resume point are the uninterrupted run's
    la = [h["loss"] for h in whole.state.log_history if "loss" in h and h["step"] > SAVE_AT]
    lb = [h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > SAVE_AT]
    assert la == lb and len(la) == STEPS - SAVE_AT
