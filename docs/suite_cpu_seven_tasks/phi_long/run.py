"""Experiment (issue 17): the complement weight phi of the subspace forms at longer runs.
Rows 'adafactor' and 'adafactor-b0.9' (floor, target), the peers (flora.bench.suite.peers.PEERS), 'default' (the
library's default form, 'floored'; its momentum in float32 until 2026-12-02, in bfloat16 since: "auto"), 'bf16' (it with
momentum_dtype="bfloat16"), 'fp32' (it with momentum_dtype="float32"),
'scaled' (the default until 2026-12-01), 'exact' (phi = 1 - beta1 = 0.1) fixed phi values and 'floorW' ('scaled' with phi at least W), by
monkeypatching the 'scaled' form's phi (the library is unchanged); 3 seeds.
argv: out.jsonl task scale rank rows lrs [first-last seed, default 0-2]
e.g.  out.jsonl tabstream 4 8 scaled,exact,0.4 2e-3,4e-3"""
import json, sys
import torch
from flora import momentum
from flora.bench.suite import peers, runner, space

out_path, task, scale, rank = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
rows, lrs = sys.argv[5].split(","), [float(x) for x in sys.argv[6].split(",")]
first, last = (int(x) for x in (sys.argv[7] if len(sys.argv) > 7 else "0-2").split("-"))
runner._init("runs/suite-data", "cpu", scale, 1)
done = set()
try:
    for line in open(out_path):
        r = json.loads(line)
        done.add((r["task"], r["row"], r["rank"], r["lr"], r["seed"], r["scale"]))
except FileNotFoundError:
    pass
original = momentum.complement_scale_t
with open(out_path, "a") as out:
    for row in rows:
        if row.startswith("adafactor") or row in peers.PEERS:  # the floor, the target, the peers
            momentum.complement_scale_t = original
            name = row
        elif row in ("default", "bf16", "fp32"):  # the library's default form; its momentum_dtype "bfloat16", "float32"
            momentum.complement_scale_t = original
            name = f"flora-r{rank}" + ("" if row == "default" else f"+{row}")
        elif row in ("scaled", "exact"):
            momentum.complement_scale_t = original
            name = f"flora-r{rank}-{row}-orthonormal"
        elif row.startswith("floor"):  # 'scaled' with its phi at least this: floor0.4
            momentum.complement_scale_t = lambda c_norm, cu_norm, bc, w=float(row[5:]): original(c_norm, cu_norm, bc).clamp(min=w)
            name = f"flora-r{rank}-scaled-orthonormal"
        else:
            momentum.complement_scale_t = lambda c_norm, cu_norm, bc, phi=float(row): torch.full_like(c_norm, phi)
            name = f"flora-r{rank}-scaled-orthonormal"
        for seed in range(first, last + 1):
            for lr in lrs:
                if (task, row, rank, lr, seed, scale) in done:
                    continue
                r = runner.run_job(space.Job(task, name, lr, seed, 100))
                r.update(row=row, rank=rank, scale=scale)
                out.write(json.dumps(r) + "\n"); out.flush()
