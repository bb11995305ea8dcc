"""GPU diagnosis: (1) every synchronizing call a step makes (sync-debug 'warn', with the
flora frame that made it); (2) compiled vs eager, per step and parameter, in variants."""
import sys, time, traceback, warnings, collections
import torch
from torch import nn
sys.path.insert(0, "src")
from flora import Flora

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
SHAPES = [(48, 32), (48, 32), (32,), (6, 3, 3, 3)]

def syncs():
    sites = collections.Counter()
    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack() if "/flora/" in f.filename]
        where = " <- ".join(f"{f.filename.split('/flora/')[-1]}:{f.lineno}" for f in reversed(frames[-4:]))
        sites[f"{str(message)[:60]} @ {where}"] += 1
    for kw in [dict(), dict(momentum_dtype=None), dict(rank=None), dict(foreach=False), dict(compile=True),
               dict(compile=True, foreach=False), dict(momentum_form="exact", projection="gaussian", cache_projections=False)]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, device=dev)) for s in SHAPES]
        opt = Flora(params, **{**dict(lr=1e-2, rank=4, beta1=0.9, kappa=2), **kw})
        old = warnings.showwarning
        for t in range(4):
            for p in params:
                p.grad = torch.randn_like(p)
            torch.cuda.synchronize()
            warnings.showwarning = show
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = show
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = old
        print(f"syncs {kw}: {sum(sites.values())} so far", flush=True)
    for k, v in sites.most_common():
        print(f"  {v:4d}  {k}")

def run(compiled, how="option", foreach=None, nan=True, sched=True, wd=0.1, tensor_lr=True, steps=7, **extra):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, device=dev)) for s in SHAPES]
    lr = torch.tensor(1e-2, device=dev) if tensor_lr else 1e-2
    opt = Flora(params, lr=lr, rank=4, beta1=0.9, kappa=2, foreach=foreach, weight_decay=wd,
                compile=compiled and how == "option", **extra)
    s = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)) if sched else None
    step = torch.compile(opt.step) if compiled and how == "user" else opt.step
    gen = torch.Generator().manual_seed(1)
    hist = []
    for t in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen)
            if nan and t == 4 and i == 0:
                g.view(-1)[0] = float("nan")
            p.grad = g.to(dev)
        step()
        if s: s.step()
        hist.append([p.detach().clone() for p in params])
    return hist

def compare(**kw):
    t0 = time.time()
    a, b = run(False, **kw), run(True, **kw)
    rows = [" ".join(f"{(x - y).abs().max().item():.1e}" for x, y in zip(pa, pb)) for pa, pb in zip(a, b)]
    print(f"{kw} ({time.time() - t0:.0f} s): per step, max |compiled - eager| of each param {SHAPES}")
    for t, r in enumerate(rows):
        print(f"   t={t}: {r}")
    sys.stdout.flush()

if __name__ == "__main__":
    if dev == "cuda":
        syncs()
    compare()
    compare(nan=False)
    compare(sched=False)
    compare(momentum_dtype=None)
    compare(how="user")
    compare(nan=False, sched=False, momentum_dtype=None)
