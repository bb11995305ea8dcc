"""Which lr each form settles at, against the floor's (issue 17, thirty-fourth session,
2026-12-05): a reading of runs made in earlier sessions, nothing new ran.

A compressed-momentum form steps the momentum's subspace at the lr and its complement at
w times the lr (w: the complement weight; 0.1 for `exact`, at least 0.4 for the default
`floored`, about 0.2 for `scaled` on noise-like gradients). So each form, at its best lr,
sets two lrs. For every task where the floor (Adafactor beta1=None), the target
(beta1=0.9), `exact` and a w of 0.2-0.4 ran in one protocol with 3 seeds, this prints each
row's best lr (best mean validation loss over seeds 0-2; `*` where no lr tried on
either side of it, on any seed), its test
loss, and the lrs its two parts get, as multiples of the floor's best lr.

Sources (one protocol each):
- ../suite_cpu_seven_tasks/runs.jsonl: the seven small tasks at 1x, kappa 1000, `scaled`
  and `exact` at r8 and r32 (second and third CPU sessions);
- ../suite_cpu_seven_tasks/phi_long/runs_newslm.jsonl: newslm at 2x (600 steps), kappa
  100, `fixed` 0.4 and `exact` (fourth CPU session);
- runs_bytelm2x.jsonl: bytelm at 2x (800 steps), kappa 100, the default and `exact`
  (sixteenth session).

Writes lr_split.md and lr_split.csv beside this file; run from anywhere."""
import collections
import csv
import json
import statistics
from pathlib import Path

here = Path(__file__).parent
SEEDS = (0, 1, 2)
SOURCES = [  # (file, steps, kappa, {row label: (optimizer or row name, complement weight)})
    (here.parent / "suite_cpu_seven_tasks" / "runs.jsonl", None, 1000,
     {"floor": ("adafactor", None), "target": ("adafactor-b0.9", None),
      "scaled r8": ("flora-r8-scaled-orthonormal", "~0.2"), "exact r8": ("flora-r8-exact-orthonormal", 0.1),
      "scaled r32": ("flora-r32-scaled-orthonormal", "~0.2"), "exact r32": ("flora-r32-exact-orthonormal", 0.1)}),
    (here.parent / "suite_cpu_seven_tasks" / "phi_long" / "runs_newslm.jsonl", 600, 100,
     {"floor": ("adafactor", None), "target": ("adafactor-b0.9", None),
      "fixed 0.4 r8": ("0.4", 0.4), "exact r8": ("exact", 0.1)}),
    (here / "runs_bytelm2x.jsonl", 800, 100,
     {"floor": ("adafactor", None), "target": ("adafactor-b0.9", None),
      "default r8": ("default", 0.4), "exact r8": ("exact", 0.1)}),
]


def load(path, steps, kappa):
    runs = collections.defaultdict(lambda: collections.defaultdict(dict))  # (task, name) -> lr -> seed -> run
    for line in open(path):
        r = json.loads(line)
        if r.get("status", "ok") != "ok" or r.get("val_loss") is None or r["kappa"] != kappa:
            continue
        if steps is not None and r["steps"] != steps:
            continue
        if r.get("scale", 1.0) not in (1.0, None) and steps is None:
            continue
        for name in {r["optimizer"], r.get("row")} - {None}:
            if r.get("rank") not in (None, 8) and name == r.get("row"):
                continue  # rows named without a rank are r8 in these files
            runs[(r["task"], name)][r["lr"]][r["seed"]] = r
    return runs


def best(by_lr):
    """(lr, at an end of the grid, mean test loss) at the best mean validation loss over SEEDS."""
    full = {lr: s for lr, s in by_lr.items() if all(k in s for k in SEEDS)}
    if not full:
        return None
    lr = min(full, key=lambda x: statistics.mean(full[x][k]["val_loss"] for k in SEEDS))
    grid = sorted(by_lr)  # every lr tried, on any seed: a neighbour run on seed 0 alone bounds the grid
    test = statistics.mean(full[lr][k]["test_loss"] for k in SEEDS)
    return lr, lr in (grid[0], grid[-1]), test


rows = []
for path, steps, kappa, labels in SOURCES:
    runs = load(path, steps, kappa)
    for task in sorted({t for t, _ in runs}):
        found = {lab: best(runs[(task, name)]) for lab, (name, _) in labels.items() if (task, name) in runs}
        if not all(found.get(k) for k in ("floor", "target")) or not any(k.startswith("exact") for k in found):
            continue
        floor_lr, _, floor_loss = found["floor"]
        for lab, res in found.items():
            if res is None:
                continue
            lr, edge, test = res
            w = labels[lab][1]
            wv = 0.2 if w == "~0.2" else w
            rows.append(dict(task=task, steps=steps or "1x", kappa=kappa, row=lab, lr=lr, edge=edge, test=test,
                             ratio=test / floor_loss, lr_over_floor=lr / floor_lr,
                             complement_over_floor=(lr * wv / floor_lr) if wv else lr / floor_lr, w=w))

with open(here / "lr_split.csv", "w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=list(rows[0]))
    wr.writeheader()
    wr.writerows(rows)
out = ["| task (steps, kappa) | row | w | best lr | test loss / floor's | lr / floor's lr "
       "| complement's lr / floor's lr |",
       "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
for r in rows:
    out.append(f"| {r['task']} ({r['steps']}, {r['kappa']}) | {r['row']} | {r['w'] if r['w'] is not None else ''} | "
               f"{r['lr']:g}{'*' if r['edge'] else ''} | {r['ratio']:.3f} | {r['lr_over_floor']:.2g} | "
               f"{r['complement_over_floor']:.2g} |")
(here / "lr_split.md").write_text(
    "Each row at its best lr (mean validation loss over seeds 0-2; `*`: an end of its grid); "
    "test loss as a ratio to the floor's (Adafactor beta1=None at its best lr); the lr and the "
    "complement's lr (w x lr) as multiples of the floor's best lr. Made by lr_split.py.\n\n" + "\n".join(out) + "\n")
print("\n".join(out))
