"""Experiment (issue 17 lead): the 'scaled' form with its complement weight phi fixed to a
constant (phi = 1 - beta1 = 0.1 is 'exact'; 'scaled' adapts phi, about 0.2-0.25 on newslm).
Monkeypatched; the library is unchanged. argv: out.jsonl tasks lrs phis [rank, default 8]"""
import json, sys, torch
from flora import momentum
from flora.bench.suite import runner, space

out = open(sys.argv[1], "a")
runner._init("runs/suite-data", "cpu", 1.0, 1)
tasks, lrs = sys.argv[2].split(","), [float(x) for x in sys.argv[3].split(",")]
rank = int(sys.argv[5]) if len(sys.argv) > 5 else 8
for phi in [float(x) for x in sys.argv[4].split(",")]:
    momentum.complement_scale_t = lambda c_norm, cu_norm, bc, phi=phi: torch.full_like(c_norm, phi)
    for seed in range(3):
        for task in tasks:
            for lr in lrs:
                r = runner.run_job(space.Job(task, f"flora-r{rank}-scaled-orthonormal", lr, seed, 100))
                r["phi"], r["rank"] = phi, rank
                out.write(json.dumps(r) + "\n"); out.flush()
