"""Which setting makes the compiled dense step differ from eager on CUDA (first steps)."""
import sys, time
import torch
from torch import nn
sys.path.insert(0, "src")
import torch._inductor.config as ic
from flora import Flora
import flora.compiled as C

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
BASE = dict(lr=1e-2, rank=4, beta1=0.9, kappa=2, weight_decay=0.1)

def run(shapes, compiled, steps=3, **kw):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, device=dev)) for s in shapes]
    kw = {**BASE, **kw}
    if kw.pop("tensor_lr", True):
        kw["lr"] = torch.tensor(kw["lr"], device=dev)
    opt = Flora(params, compile=compiled, **kw)
    gen = torch.Generator().manual_seed(1)
    out = []
    for t in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dev)
        before = [p.detach().clone() for p in params]
        opt.step()
        out.append([(p.detach().clone(), (p.detach() - b).abs().max().item()) for p, b in zip(params, before)])
    return out

def variant(name, shapes, config=None, **kw):
    t0 = time.time()
    torch._dynamo.reset(); C._compiled.clear()
    saved = {k: getattr(ic, k) if "." not in k else getattr(ic.triton, k.split(".")[1]) for k in (config or {})}
    for k, v in (config or {}).items():
        setattr(ic.triton, k.split(".")[1], v) if "." in k else setattr(ic, k, v)
    try:
        a, b = run(shapes, False, **kw), run(shapes, True, **kw)
        cells = " | ".join(" ".join(f"{(x[0] - y[0]).abs().max().item():.1e}" for x, y in zip(sa, sb)) for sa, sb in zip(a, b))
        print(f"{name:14s} diff by step: {cells}   (eager move {a[0][0][1]:.1e}; {time.time() - t0:.0f} s)", flush=True)
    except Exception as e:
        print(f"{name:14s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    finally:
        for k, v in saved.items():
            setattr(ic.triton, k.split(".")[1], v) if "." in k else setattr(ic, k, v)

D4, V = [(6, 3, 3, 3)], [(32,)]
variant("4d", D4)
variant("vec", V)
variant("4d noPR", D4, {"triton.persistent_reductions": False})
variant("vec noPR", V, {"triton.persistent_reductions": False})
variant("4d b1None", D4, beta1=None)
variant("vec b1None", V, beta1=None)
variant("4d noscale", D4, scale_parameter=False)
variant("4d wd0", D4, weight_decay=0.0)
variant("4d floatlr", D4, tensor_lr=False)
variant("4d emulate", D4, {"emulate_precision_casts": True})
variant("2d 6x27", [(6, 27)])
variant("2d 6x27 r=None", [(6, 27)], rank=None)
variant("4d mom32", D4, momentum_dtype=None)
variant("mix4", [(48, 32), (48, 32), (32,), (6, 3, 3, 3)])
variant("vec+4d", [(32,), (6, 3, 3, 3)])
variant("mix4 noPR", [(48, 32), (48, 32), (32,), (6, 3, 3, 3)], {"triton.persistent_reductions": False})
