"""Held-out task (issue 17, not part of the project): an MLP autoencoder on scikit-learn's
digits, mean squared reconstruction error on held-out images. Rows: HF Adafactor
beta1=None (floor), beta1=0.9 (target), flora.Flora defaults at rank 8 and 32;
scale_parameter=False, relative_step=False, warmup_init=False, constant lr, one thread.
usage: python docs/quality/heldout_autoencoder.py OUT.jsonl ROW LR SEED   (ROW: floor, target, r8, r32)
The runs of 2026-12-08 are heldout_autoencoder.jsonl; heldout_summary.py OUT.jsonl tabulates them."""
import json, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import transformers
from torch import nn
from sklearn.datasets import load_digits
import flora

torch.set_num_threads(1)
out, row, lr, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
STEPS, B = int(os.environ.get("STEPS", 600)), 64
X = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
X = X[perm]
n_test = len(X) // 5
test, train = X[:n_test], X[n_test:]
torch.manual_seed(seed)
model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 32),
                      nn.GELU(), nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64))
params = list(model.parameters())
common = dict(scale_parameter=False, relative_step=False, warmup_init=False)
if row == "floor":
    opt = transformers.optimization.Adafactor(params, lr=lr, beta1=None, **common)
elif row == "target":
    opt = transformers.optimization.Adafactor(params, lr=lr, beta1=0.9, **common)
else:
    opt = flora.Flora(params, lr=lr, beta1=0.9, rank=int(row[1:]), **common)
g = torch.Generator().manual_seed(1000 + seed)
t0 = time.time()
for step in range(STEPS):
    idx = torch.randint(0, len(train), (B,), generator=g)
    x = train[idx]
    x_noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    loss = nn.functional.mse_loss(model(x_noisy), x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
with torch.no_grad():
    test_mse = nn.functional.mse_loss(model(test), test).item()
rec = dict(row=row, lr=lr, seed=seed, steps=STEPS, test=test_mse, secs=round(time.time() - t0, 1))
print(json.dumps(rec))
with open(out, "a") as f:
    f.write(json.dumps(rec) + "\n")
