"""One optimizer's step on SmolLM2-135M's shapes, alone in a fresh process (docs/compile.md,
2026-12-07): run it several times to see how much a step moves between processes.

    python docs/step_malloc_cpu/hf_step_per_process.py hf|flora [as-is|warm|reuse] [profile]
"""
import resource
import sys
import time

import torch

import flora
from flora.bench import malloc
from flora.bench.step import SMOLLM2_135M, llama_shapes

which = sys.argv[1]
print(malloc.describe(malloc.apply(sys.argv[2] if len(sys.argv) > 2 else "as-is")))  # before any tensor
torch.set_num_threads(1)
torch.manual_seed(0)
shapes = [s for _, s in llama_shapes(SMOLLM2_135M)]
ps = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
gs = [torch.randn(s) * 1e-3 for s in shapes]
if which == "hf":
    from transformers.optimization import Adafactor

    opt = Adafactor(ps, lr=1e-3, beta1=0.9, relative_step=False, scale_parameter=True, warmup_init=False)
else:
    opt = flora.Flora(ps, lr=1e-3, beta1=0.9, rank=32, relative_step=False, scale_parameter=True)


def step():
    for p, g in zip(ps, gs):
        p.grad = g
    opt.step()


step()
step()
times = []
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(times)
print(which, "median step s", round(sorted(times)[2], 3), [round(t, 3) for t in times], "page faults a step", round(faults))
if "profile" in sys.argv:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
