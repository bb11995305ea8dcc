"""Optimizer state and Flora's projection cache, in bytes counted from the tensors
(``flora.state_bytes``, ``flora.cache_bytes``), on the bench's pretrain model at the quick
and full sizes, after two steps on random gradients: the table of docs/results.md, "The
state goal counts Flora's projection cache".

    python docs/state_cache_bytes.py
"""
import tempfile

import torch

import flora
from flora.bench import config, tasks
from flora.bench import optimizers as bo

torch.set_num_threads(1)
cache = tempfile.mkdtemp()
for size in ("quick", "full"):
    cfg = config.task_config(size, "pretrain")
    task = tasks.make_task("pretrain", cfg, cache, seed=0)
    held = {}
    for name in ("adamw", "flora-r8", "flora-r32"):
        built = bo.build(bo.parse(name), task.build_model(), 1e-3, task=task, kappa=cfg.kappa, tau=1, seed=0,
                         scale_parameter=cfg.scale_parameter)
        for _ in range(2):
            for p in built.model.parameters():
                p.grad = torch.randn_like(p) * 1e-2
            built.optimizer.step()
        held[name] = flora.state_bytes(built.optimizer), flora.cache_bytes(built.optimizer)
    adamw = held["adamw"][0]
    for name, (state, cached) in held.items():
        print(f"{size} {name}: state {state} B, cache {cached} B, {100 * state / adamw:.1f}% of AdamW, "
              f"{100 * (state + cached) / adamw:.1f}% with the cache")
