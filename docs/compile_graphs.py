"""The compile time of each graph of Flora(rank=32, beta1=0.9, compile=True) on SmolLM2-135M's
shapes (docs/compile.md): inductor is warmed up first on a one-line function (its
one-time costs, the vector-ISA probe among them, are not any graph's), then the first
step times each compiled call; then 6 steps and the parameters' sum. Run in an empty
inductor cache:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python docs/compile_graphs.py [none|auto]
"""
import sys
import time

import torch

import flora
import flora.compiled as C
from flora.bench.step import SMOLLM2_135M, llama_shapes

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for _, s in llama_shapes(SMOLLM2_135M)]
for p in params:
    p.grad = torch.randn(p.shape, generator=g) * 1e-3
md = {} if len(sys.argv) < 2 else {"momentum_dtype": None if sys.argv[1] == "none" else sys.argv[1]}

t0 = time.perf_counter()
warm = torch.compile(lambda x: x.sin() + 1, fullgraph=True)
warm(torch.randn(8))
print(f"inductor's first compile (a one-line function): {time.perf_counter() - t0:.1f} s")

compiled_core, log = C.compiled_core, []


def timed(part, *args, **kwargs):
    fn = compiled_core(part, *args, **kwargs)

    def call(spec, *a, **kw):
        t = time.perf_counter()
        out = fn(spec, *a, **kw)
        log.append((part, spec.shape, len(a[0]), time.perf_counter() - t))  # a list, or a stack
        return out
    return call


C.compiled_core = timed
opt = flora.Flora(params, lr=1e-3, rank=32, beta1=0.9, compile=True, **md)
t0 = time.perf_counter()
opt.step()
total = time.perf_counter() - t0
print("| core | shape | parameters | first call s |\n| --- | --- | --- | ---: |")
for part, shape, k, dt in log:
    if dt > 0.3:  # a compile, not a call of a graph compiled before
        print(f"| {'one graph' if part is True else part} | {shape} | {k} | {dt:.1f} |")
print(f"first step {total:.1f} s")
times = []
for _ in range(6):
    t0 = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t0)
print("steps", " ".join(f"{t:.3f}" for t in times))
print("parameters' sum", float(sum(p.detach().double().sum() for p in params)))
