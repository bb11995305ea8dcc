import torch, statistics, flora
from flora import momentum, functional
from flora.bench.suite import runner, space, workloads
torch.set_num_threads(1)
runner._init("runs/suite-data", "cpu", 1.0, 1)
w = runner._workload("newslm")
log = []
orig = momentum.complement_scale_t
def spy(c_norm, cu_norm, bc):
    out = orig(c_norm, cu_norm, bc); log.append(out.detach().float().mean().item()); return out
momentum.complement_scale_t = spy
model = w.build(0)
opt = flora.Flora(model.parameters(), lr=2e-3, relative_step=False, scale_parameter=False, rank=8, beta1=0.9, kappa=100)
per_step = []
for step in range(300):
    x, y = w.batch(step, 0)
    n0 = len(log)
    w.loss(model, x, y).backward(); opt.step(); opt.zero_grad()
    per_step.append(statistics.fmean(log[n0:]) if len(log) > n0 else float('nan'))
for s in (90, 95, 99, 100, 101, 102, 105, 110, 120, 150, 199, 200, 201, 202, 205, 210, 220):
    print(s, round(per_step[s], 3))
