"""Would factoring conv weights' second moment over the (out, in*kh*kw) matrix (the view Flora's
momentum already uses) cost quality? Emulated without a library change: the suite's cnn net with each
conv weight held as a 2-D parameter (same init), so Flora/Adafactor factor the matrix view."""
import json, sys, torch
from torch import nn
import torch.nn.functional as F
from flora.bench.suite import runner, space, workloads

class MatConv(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.shape = conv.weight.shape
        self.weight = nn.Parameter(conv.weight.detach().reshape(self.shape[0], -1).clone())
        self.bias = nn.Parameter(conv.bias.detach().clone())
    def forward(self, x):
        return F.conv2d(x, self.weight.view(self.shape), self.bias, padding=1)

orig = workloads._cnn
def _cnn(seed, device):
    m = orig(seed, device)
    return nn.Sequential(*[MatConv(l) if isinstance(l, nn.Conv2d) else l for l in m])
workloads._cnn = _cnn

out = open(sys.argv[1], "a")
runner._init("runs/suite-data", "cpu", 1.0, 1)
tasks, opts = sys.argv[2].split(","), sys.argv[3].split(",")
lrs = [float(x) for x in sys.argv[4].split(",")]
for seed in range(3):
    for task in tasks:
        for opt in opts:
            for lr in lrs:
                r = runner.run_job(space.Job(task, opt, lr, seed))
                out.write(json.dumps(r) + "\n"); out.flush()
