"""The cold first step of Flora(rank=32, beta1=0.9, compile=True) on SmolLM2-135M's shapes
(docs/compile.md, sixth pass): wall and main-process CPU time, dynamo's graph count and
compile_times() phases, then 6 steps and the parameters' sum (equal across code
versions when they compute the same). Run each code version in a process of its own,
with an empty inductor cache (``TORCHINDUCTOR_COMPILE_THREADS=1`` compiles the C++ in this
process's own children, whose CPU time is then counted: the sum is steadier than wall
time on a shared machine):

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python docs/compile_cold.py
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) PYTHONPATH=/tmp/base7/src python docs/compile_cold.py

An argument sets momentum_dtype (``none`` for None, float32; the default since 2026-12-02 is
"auto", bfloat16 here): ``python docs/compile_cold.py none``.

``--graphs``: inductor is first warmed up on a one-line function (its one-time costs, the
vector-ISA probe among them, are then no graph's), and each compiled call of the first
step is timed: a table of each graph's compile.
"""
import resource
import sys
import time

import torch

import flora
from flora.bench.step import SMOLLM2_135M, llama_shapes

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for _, s in llama_shapes(SMOLLM2_135M)]
for p in params:
    p.grad = torch.randn(p.shape, generator=g) * 1e-3
args = [a for a in sys.argv[1:] if a != "--graphs"]
md = {} if not args else {"momentum_dtype": None if args[0] == "none" else args[0]}
log = []
if "--graphs" in sys.argv:
    import flora.compiled as C

    t0 = time.perf_counter()
    torch.compile(lambda x: x.sin() + 1, fullgraph=True)(torch.randn(8))
    print(f"inductor's first compile (a one-line function): {time.perf_counter() - t0:.1f} s")
    compiled_core = C.compiled_core

    def timed(part, *a, **kw):
        fn = compiled_core(part, *a, **kw)

        def call(spec, *args, **kwargs):
            t = time.perf_counter()
            out = fn(spec, *args, **kwargs)
            log.append((part, spec.shape, len(args[0]), time.perf_counter() - t))  # a list or a stack
            return out
        return call

    C.compiled_core = timed
opt = flora.Flora(params, lr=1e-3, rank=32, beta1=0.9, compile=True, **md)
print("momentum_dtype", opt.param_groups[0]["momentum_dtype"])

def children_cpu() -> float:  # the C++ compilers inductor ran and waited for
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu()
opt.step()
print(f"flora {flora.__file__}: first step wall {time.perf_counter() - t0:.1f} s, CPU {time.process_time() - c0:.1f} s"
      f" (+ {children_cpu() - k0:.1f} s in compilers this process waited for)")
if log:
    print("| core | shape | parameters | first call s |\n| --- | --- | --- | ---: |")
    for part, shape, k, dt in log:
        if dt > 0.3:  # a compile, not a call of a graph compiled before
            print(f"| {'one graph' if part is True else part} | {shape} | {k} | {dt:.1f} |")
from torch._dynamo.utils import compile_times, counters  # noqa: E402

print("graphs", counters["stats"]["unique_graphs"])
phases = ("fused_nodes", "Scheduler", "compile_file", "async_compile", "GraphLowering.run", "bytecode", "compile_inner")
print("\n".join(line for line in compile_times(repr="str", aggregate=True).splitlines() if any(x in line for x in phases)))
times = []
for _ in range(6):
    t0 = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t0)
print("steps", " ".join(f"{t:.3f}" for t in times))
print("parameters' sum", float(sum(p.detach().double().sum() for p in params)))
