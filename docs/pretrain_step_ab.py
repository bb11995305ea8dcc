"""Compiled Flora r32 against HF Adafactor (beta1=0.9) on the bench's pretrain model
(Llama 4 x 128, ffn 352, bytes; 38 tensors), one thread: the A/B of docs/results.md's
fortieth-session notes. Run it once per copy of flora's source, alternating, e.g.

    for src in /path/to/old/src src /path/to/old/src src; do
        PYTHONPATH=$src taskset -c 0 python docs/pretrain_step_ab.py fp32
    done

MOMENTUM: "default" (bfloat16 with a rank) or "fp32" (momentum_dtype=None, the default
before 2026-12-02). Prints the median of 7 rounds of 30 steps, Flora then HF twice, and
the ratio of their sums. Random gradients (the step's cost does not depend on them).
"""
import sys
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import flora

torch.set_num_threads(1)
momentum = sys.argv[1] if len(sys.argv) > 1 else "default"
cfg = dict(num_hidden_layers=4, hidden_size=128, intermediate_size=352, num_attention_heads=4,
           num_key_value_heads=4, vocab_size=256, tie_word_embeddings=True)
torch.manual_seed(0)
params = list(LlamaForCausalLM(LlamaConfig(**cfg)).parameters())
for p in params:
    p.grad = torch.randn_like(p) * 1e-2
hf = transformers.optimization.Adafactor([p.detach().clone().requires_grad_() for p in params], lr=1e-3, beta1=0.9,
                                         relative_step=False, scale_parameter=True, warmup_init=False)
for q, p in zip(hf.param_groups[0]["params"], params):
    q.grad = p.grad.clone()
kw = dict(lr=1e-3, beta1=0.9, rank=32, kappa=1000, relative_step=False, scale_parameter=True, compile=True,
          momentum_form="floored")
if momentum != "default":
    kw["momentum_dtype"] = None
opt = flora.Flora(params, **kw)
for _ in range(3):  # compiles (cold: tens of seconds)
    opt.step()
    hf.step()


def median_ms(step, n=30):
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        times.append((time.perf_counter() - t0) / n * 1e3)
    return sorted(times)[3]


a, b, c, d = median_ms(opt.step), median_ms(hf.step), median_ms(opt.step), median_ms(hf.step)
print(f"{flora.__file__} {momentum}: flora {a:.2f} {c:.2f} ms  hf {b:.2f} {d:.2f} ms  ratio {(a + c) / (b + d):.3f}")
