"""The BBC split's leak at the suite's length (1x): each run of suite_runs.jsonl (the suite's
log of this folder's 1x runs, on split version 2) against the same (task, row, lr, seed) on
the old split, from the logs the win matrix read before (../suite_cpu_big_tasks/runs.jsonl:
classify and finetune; ../suite_cpu_seven_tasks/runs.jsonl and ../suite_default/runs_1x.jsonl:
newslm). Train is the same on both splits, so a run that trained alike (final train loss
within 1e-5; the code moved in between) differs only in what it is scored on. Writes
shift_1x.md; run from this folder."""
import collections
import json
import statistics as st
from pathlib import Path

here = Path(__file__).parent
docs = here.parent


def row(r):
    o = r.get("optimizer", "")
    if o in ("adafactor", "adafactor-b0.9"):
        return o
    if r.get("row") in ("default", "bf16") or o in ("flora-r8-floored-orthonormal", "flora-r32-floored-orthonormal"):
        return f"r{r['rank']}" if "rank" in r and r.get("row") else o.split("-")[1]
    if o == "flora-r8-exact-orthonormal" and r.get("kappa") == 100:
        return "r8 exact"
    return None


def read(paths, tasks):
    out = {}
    for p in paths:
        for line in open(p):
            r = json.loads(line)
            if r["task"] in tasks and r.get("status", "ok") == "ok" and r.get("scale", 1.0) == 1.0 and row(r):
                out[(r["task"], row(r), r["lr"], r["seed"])] = r
    return out


new = read([here / "suite_runs.jsonl"], {"classify", "finetune", "newslm"})
old = read([docs / "suite_cpu_big_tasks" / "runs.jsonl", docs / "suite_cpu_seven_tasks" / "runs.jsonl",
            docs / "suite_default" / "runs_1x.jsonl"], {"classify", "finetune", "newslm"})
by = collections.defaultdict(lambda: collections.defaultdict(list))
for key, r in new.items():
    o = old.get(key)
    if o is None:
        continue
    alike = abs(o["train_loss"] - r["train_loss"]) < 1e-5
    for m in ("val_loss", "test_loss"):
        by[key[0]][(m, alike)].append(r[m] - o[m])
lines = ["| task | runs on both splits | trained alike | val loss, v2 - before (alike) | test loss, v2 - before (alike) | test loss, v2 - before (the others) |",
         "| --- | ---: | ---: | ---: | ---: | ---: |"]
fmt = lambda v: f"{st.mean(v):+.4f} ({min(v):+.4f} to {max(v):+.4f})" if v else "-"  # noqa: E731
for task, d in sorted(by.items()):
    n_alike, n_other = len(d[("test_loss", True)]), len(d[("test_loss", False)])
    lines.append(f"| {task} | {n_alike + n_other} | {n_alike} | {fmt(d[('val_loss', True)])} | "
                 f"{fmt(d[('test_loss', True)])} | {fmt(d[('test_loss', False)])} |")
(here / "shift_1x.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

# classify's test accuracy, each row at its lr of best mean validation loss (the suite's rule), on each split
acc = ["", "| classify, test accuracy | floor | target | r8 | r32 |", "| --- | ---: | ---: | ---: | ---: |"]
for name, runs in (("before (222 test articles)", old), ("v2 (206)", new)):
    cells = []
    for r_ in ("adafactor", "adafactor-b0.9", "r8", "r32"):
        grid = collections.defaultdict(dict)
        for (task, row_, lr, seed), r in runs.items():
            if task == "classify" and row_ == r_:
                grid[lr][seed] = r
        grid = {lr: s for lr, s in grid.items() if len(s) == 3}
        lr = min(grid, key=lambda x: st.mean(r["val_loss"] for r in grid[x].values()))
        a = [r["test_accuracy"] for r in grid[lr].values()]
        cells.append(f"{100 * st.mean(a):.2f}% ({lr:g})")
    acc.append(f"| {name} | " + " | ".join(cells) + " |")
with open(here / "shift_1x.md", "a") as f:
    f.write("\n".join(acc) + "\n")
print("\n".join(acc))
