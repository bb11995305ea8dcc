"""Drop-in use with the Hugging Face Trainer: Flora as its optimizer, CompressedAccumulator
on its gradient-accumulation loop."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import flora


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def _train(tmp_path, rank, *, n=32, epochs=None, lr=1e-2, sched=None):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    opt = flora.Flora(model.parameters(), lr=lr, rank=4, beta1=0.9)
    acc = None if rank == "none" else flora.CompressedAccumulator(model, rank=rank, tau=2, optimizer=opt, seed=1)
    length = dict(max_steps=4) if epochs is None else dict(num_train_epochs=epochs)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             report_to=[], save_strategy="no", use_cpu=True, max_grad_norm=1.0,
                             disable_tqdm=True, seed=0, logging_steps=1, **length)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(n),
                      optimizers=(opt, None if sched is None else sched(opt)))
    trainer.train()
    model.log = trainer.state.log_history
    return model, acc


def test_dense_accumulator_inside_trainer_changes_nothing(tmp_path):
    ref, _ = _train(tmp_path / "a", "none")
    got, acc = _train(tmp_path / "b", None)  # rank=None: hooks attached, every parameter dense
    assert acc.cycle == 4
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)


def test_compressed_accumulator_inside_trainer(tmp_path):
    ref, _ = _train(tmp_path / "a", "none")
    got, acc = _train(tmp_path / "b", 4)
    assert acc.cycle == 4 and acc.micro_step == 0  # one cycle per optimizer step, none left open
    moved = [not torch.equal(a, b) for a, b in zip(ref.parameters(), got.parameters()) if a.dim() == 2]
    assert any(moved)  # the compressed estimate, not the dense sum, reached the optimizer
    assert all(torch.isfinite(p).all() for p in got.parameters())


def test_epochs_with_a_short_last_cycle(tmp_path):
    """36 samples in batches of 4 are 9 micro-batches an epoch: with tau=2 every epoch ends
    with a cycle of one. Dense: bit-identical to the Trainer alone; compressed: every
    cycle, the short ones included, is closed by its own optimizer step."""
    ref, _ = _train(tmp_path / "a", "none", n=36, epochs=2)
    got, acc = _train(tmp_path / "b", None, n=36, epochs=2)
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)
    assert acc.cycle == 10 and acc.micro_step == 0
    got, acc = _train(tmp_path / "c", 4, n=36, epochs=2)
    assert acc.cycle == 10 and acc.micro_step == 0
    assert all(torch.isfinite(p).all() for p in got.parameters())


def test_relative_step_mode_with_its_schedule(tmp_path):
    got, _ = _train(tmp_path / "a", "none", lr=None, sched=flora.RelativeStepSchedule)
    lrs = [e["learning_rate"] for e in got.log if "learning_rate" in e]
    assert lrs == [1e-2] * 4  # min(1e-2, 1/sqrt(t)) for t <= 4
