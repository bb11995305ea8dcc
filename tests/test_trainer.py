"""Drop-in use with the Hugging Face Trainer: Flora as its optimizer, CompressedAccumulator
on its gradient-accumulation loop."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import flora


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        x = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def _train(tmp_path, rank):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    opt = flora.Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9)
    acc = None if rank == "none" else flora.CompressedAccumulator(model, rank=rank, tau=2, optimizer=opt, seed=1)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=4, report_to=[], save_strategy="no", use_cpu=True, max_grad_norm=1.0,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None)).train()
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
