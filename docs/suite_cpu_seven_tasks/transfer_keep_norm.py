"""Experiment (issue 17 lead): the 'scaled' form with a norm-preserving momentum transfer at
each redraw (the transferred momentum rescaled, per matrix, to the norm it had), so that the
complement weight does not halve at a redraw. Monkeypatched; the library is unchanged."""
import json, sys, torch
from flora import functional, projection
from flora.bench.suite import runner, space

orig = projection.transfer
def transfer_np(c, a_old, a_new, dim):
    out = orig(c, a_old, a_new, dim)
    old = torch.linalg.vector_norm(c, dim=(-2, -1), keepdim=True)
    new = torch.linalg.vector_norm(out, dim=(-2, -1), keepdim=True)
    return out * torch.where(new > 0, old / new, torch.ones_like(new))
functional.transfer = transfer_np

out = open(sys.argv[1], "a")
runner._init("runs/suite-data", "cpu", 1.0, 1)
tasks, lrs = sys.argv[2].split(","), [float(x) for x in sys.argv[3].split(",")]
for seed in range(3):
    for task in tasks:
        for lr in lrs:
            r = runner.run_job(space.Job(task, "flora-r8-scaled-orthonormal", lr, seed, 100))
            out.write(json.dumps(r) + "\n"); out.flush()
