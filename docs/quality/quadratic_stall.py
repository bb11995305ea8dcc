"""Why Flora's default momentum form stops short of a quadratic's minimum at a constant lr,
and why Adafactor without momentum does too once its gradient carries any noise.

A diagonal quadratic ``0.5 sum(h (W - W*)^2)``, W 64 x 96, h uniform in [0.1, 2.1], lr 1e-2,
``scale_parameter=False``, beta1 0.9, momentum in float32, 4,000 steps; the gradient is
exact (sigma 0) or has Gaussian noise of std sigma added. Printed: the mean loss of the
last 500 steps (median over seeds) per form and sigma, then the linearised step's spectral
radius per largest effective step ``d = lr h / sqrt(v)``.

The mechanism: Adafactor's second moment ``v`` decays at ``t^-0.8`` per step once the
gradient is small, so the effective step ``d`` grows until the iteration is unstable;
the loss then rises until the gradient refills ``v`` and settles where ``d`` sits at the
bound (Adafactor's edge of stability; its update clipping keeps it bounded). Linearised,
the bound on ``max d`` is 2 without momentum, 2 (1 + beta1) / (1 - beta1) = 38 with full
momentum, and about 2 / w on the complement of a subspace form of weight w ("floored":
w >= 0.4, about 5). Without noise, no momentum and full momentum reach an exact 0: their
update is elementwise, so each coordinate lands on its minimum exactly (a fixed point
float arithmetic can hold), while a projected momentum couples the coordinates and
never does. With any noise (1e-6 here) that exception goes, and no momentum stalls
highest. Measured 2026-12-05 (2-core CPU; seeds 5, 7, 9):

| form | sigma 0 | sigma 1e-6 | sigma 1e-3 |
| --- | ---: | ---: | ---: |
| full momentum (rank None) | 0 | 1.1e-04 | 8.5e-03 |
| no momentum (beta1 None) | 0 | 1.6e-01 | 1.6e-01 |
| default ("floored", rank 8) | 1.4e-02 | 2.4e-02 | 2.4e-02 |
| "subspace" (w = 1), rank 8 | 9.3e-02 | 1.5e-01 | 1.5e-01 |
| "scaled", rank 8 | 5.5e-06 | 1.1e-04 | 2.3e-03 |
| "exact", rank 8 (slow: still falling at 4,000) | 2.4e-06 | 2.4e-06 | 3.2e-04 |

The linearised step's spectral radius crosses 1 between max d = 1.9 and 2.1 without
momentum and with w = 1, between 4 and 6 at w = 0.4, between 10 and 20 at w = 0.2, and
between 20 and 40 with full momentum (2 / w and 38, as above).

With the lr scheduled down (a cosine to 0 over the 4,000 steps; sigma 1e-6) full momentum
ends at 8.6e-11, no momentum at 6.1e-11 and the default at 6.0e-11.

(docs/results.md, "A constant lr near a minimum".)

    HF_HUB_OFFLINE=1 python docs/quality/quadratic_stall.py [out.json]
"""
import json
import math
import statistics
import sys
import warnings

import torch

import flora

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
N, M, LR, BETA, STEPS, RANK = 64, 96, 1e-2, 0.9, 4000, 8
SEEDS = (5, 7, 9)
SIGMAS = (0.0, 1e-6, 1e-3)
FORMS = {"full momentum (rank None)": dict(beta1=BETA),
         "no momentum (beta1 None)": dict(beta1=None),
         'default ("floored", rank 8)': dict(beta1=BETA, rank=RANK),
         '"subspace" (w = 1), rank 8': dict(beta1=BETA, rank=RANK, momentum_form="subspace"),
         '"scaled", rank 8': dict(beta1=BETA, rank=RANK, momentum_form="scaled"),
         '"exact", rank 8': dict(beta1=BETA, rank=RANK, momentum_form="exact")}


def tail_loss(seed: int, sigma: float, options: dict, cosine: bool = False) -> float:
    """The mean loss of the last 500 of STEPS steps (``cosine``: the lr scheduled down to 0
    over them, a cosine; then the final loss)."""
    w_star = torch.randn(N, M, generator=torch.Generator().manual_seed(seed))
    h = torch.rand(N, M, generator=torch.Generator().manual_seed(seed + 1)) * 2 + 0.1
    noise = torch.Generator().manual_seed(seed + 2)
    w = torch.nn.Parameter(torch.zeros(N, M))
    opt = flora.Flora([w], lr=LR, scale_parameter=False, momentum_dtype=None, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, STEPS) / STEPS)))
    losses = []
    for _ in range(STEPS):
        w.grad = h * (w.detach() - w_star)
        if sigma:
            w.grad += sigma * torch.randn(N, M, generator=noise)
        opt.step()
        if cosine:
            sched.step()
        losses.append((0.5 * h * (w.detach() - w_star) ** 2).sum().item())
    return losses[-1] if cosine else sum(losses[-500:]) / 500


def radius(form: str, d_max: float, w: float = 1.0, n: int = 16, m: int = 24, r: int = 4) -> float:
    """Spectral radius of the linearised step on a smaller quadratic (effective steps
    ``d = d_max h / max h``, a random orthonormal r x m projection): the state is the error
    and the compressed momentum; 'none' and 'full' are elementwise (2 x 2 per coordinate)."""
    h = torch.rand(n, m, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2 + 0.1
    d = d_max * h / h.max()
    if form in ("none", "full"):
        b = 0.0 if form == "none" else BETA
        return max(torch.linalg.eigvals(torch.tensor([[1 - (1 - b) * x, -b], [(1 - b) * x, b]],
                                                      dtype=torch.float64)).abs().max().item()
                   for x in d.reshape(-1).tolist())
    a = torch.linalg.qr(torch.randn(m, r, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0].T
    size = n * m + n * r

    def step(z):
        e, c = z[:n * m].view(n, m), z[n * m:].view(n, r)
        u = d * e
        cu = u @ a.T
        c_new = BETA * c + (1 - BETA) * cu
        return torch.cat([(e - c_new @ a - w * (u - cu @ a)).reshape(-1), c_new.reshape(-1)])

    jac = torch.stack([step(col) for col in torch.eye(size, dtype=torch.float64)], 1)
    return torch.linalg.eigvals(jac).abs().max().item()


def main() -> None:
    out = {"meta": dict(n=N, m=M, lr=LR, beta1=BETA, steps=STEPS, rank=RANK, seeds=SEEDS,
                        torch=torch.__version__), "tail_loss": {}, "radius": {}}
    print("| form | " + " | ".join(f"sigma {s:g}" for s in SIGMAS) + " |")
    print("| --- |" + " ---: |" * len(SIGMAS))
    for name, options in FORMS.items():
        cells = []
        for sigma in SIGMAS:
            runs = [tail_loss(seed, sigma, options) for seed in SEEDS]
            out["tail_loss"][f"{name} | {sigma:g}"] = runs
            cells.append(f"{statistics.median(runs):.1e}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("\n| lr a cosine to 0, sigma 1e-6: final loss | median |\n| --- | ---: |")
    for name in list(FORMS)[:3]:
        runs = [tail_loss(seed, 1e-6, FORMS[name], cosine=True) for seed in SEEDS]
        out["tail_loss"][f"{name} | 1e-06 | cosine"] = runs
        print(f"| {name} | {statistics.median(runs):.1e} |", flush=True)
    print("\n| max d | none | full | complement w = 1 | w = 0.4 | w = 0.2 |\n| ---: |" + " ---: |" * 5)
    for d_max in (1.9, 2.1, 4.0, 6.0, 10.0, 20.0, 40.0):
        row = [radius("none", d_max), radius("full", d_max)] + [radius("sub", d_max, w) for w in (1.0, 0.4, 0.2)]
        out["radius"][str(d_max)] = row
        print(f"| {d_max:g} | " + " | ".join(f"{x:.3f}" for x in row) + " |", flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
