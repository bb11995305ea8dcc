"""The seven suite tasks at their suite lengths (1x): Adafactor's floor and target, and
Flora's 'scaled' (the default until 2026-12-01), 'exact' and 'fixed' 0.4 (the default
since) at r8 and r32, kappa 100, 3 seeds, each at the lr of its best mean validation
loss. Sources: ../runs.jsonl (the suite), ../constant_phi_runs.jsonl and runs_1x.jsonl
(phi 0.4, monkeypatched into 'scaled': the same update as momentum_form='fixed'; and
'floored': 'scaled' with phi at least 0.4).
Writes seven_tasks.md beside this file."""
import collections, json, statistics as st
from pathlib import Path

here = Path(__file__).parent
TASKS = ("newslm", "cnn", "vit", "tabular", "stream", "cnnstream", "tabstream")
by = collections.defaultdict(dict)  # (task, row) -> lr -> seed -> test/val
for line in open(here.parent / "runs.jsonl"):
    r = json.loads(line)
    o = r["optimizer"]
    if r.get("status") != "ok":
        continue
    if o.startswith("adafactor"):
        row = o
    elif r.get("kappa") == 100 and o.startswith("flora-r") and o.endswith(("-scaled-orthonormal", "-exact-orthonormal")):
        row = o.replace("-orthonormal", "").replace("flora-", "")
    else:
        continue
    by[(r["task"], row)].setdefault(r["lr"], {})[r["seed"]] = r
for f in (here.parent / "constant_phi_runs.jsonl", here / "runs_1x.jsonl"):
    if not f.exists():
        continue
    for line in open(f):
        r = json.loads(line)
        if r.get("scale", 1.0) != 1.0:
            continue
        if r.get("row") == "floor0.4":  # 'scaled' with phi at least 0.4
            by[(r["task"], f"r{r['rank']}-floored")].setdefault(r["lr"], {})[r["seed"]] = r
            continue
        if r.get("phi", 0.4 if r.get("row") == "0.4" else None) != 0.4:
            continue
        by[(r["task"], f"r{r.get('rank', 8)}-fixed")].setdefault(r["lr"], {})[r["seed"]] = r


def best(task, row):
    grid = {lr: s for lr, s in by[(task, row)].items() if len(s) >= 3}
    if not grid:
        return None
    lr = min(grid, key=lambda x: st.mean(grid[x][s]["val_loss"] for s in range(3)))
    edge = "*" if lr in (min(grid), max(grid)) else ""
    return lr, [grid[lr][s]["test_loss"] for s in range(3)], edge


out = []
for rank in (8, 32):
    rows = ["adafactor", "adafactor-b0.9"] + [f"r{rank}-{f}" for f in ("scaled", "exact", "fixed", "floored")]
    out += [f"\n**r{rank}** (test loss / the floor's; `*`: best lr at the edge of its grid)\n",
            "| row | " + " | ".join(TASKS) + " | worst | worst without cnn |",
            "| --- |" + " ---: |" * (len(TASKS) + 2)]
    floor = {t: st.mean(best(t, "adafactor")[1]) for t in TASKS}
    for row in rows:
        cells, ratios = [], {}
        for t in TASKS:
            b = best(t, row)
            if not b:
                cells.append("-")
                continue
            ratios[t] = st.mean(b[1]) / floor[t]
            cells.append(f"{ratios[t]:.3f}{b[2]}")
        worst = max(ratios.items(), key=lambda kv: kv[1]) if len(ratios) == len(TASKS) else None
        wo = max(v for t, v in ratios.items() if t != "cnn") if len(ratios) == len(TASKS) else None
        out.append(f"| {row} | " + " | ".join(cells) + (f" | {worst[1]:.3f} ({worst[0]}) | {wo:.3f} |" if worst else " | - | - |"))
    out.append(f"\npaired over seeds, r{rank} (test loss, mean ± std)\n")
    out.append("| pair | " + " | ".join(TASKS) + " |")
    out.append("| --- |" + " ---: |" * len(TASKS))
    for first, second in (("fixed", "scaled"), ("floored", "fixed")):
        cells = []
        for t in TASKS:
            a, b = best(t, f"r{rank}-{first}"), best(t, f"r{rank}-{second}")
            if a and b:
                d = [x - y for x, y in zip(a[1], b[1])]
                cells.append(f"{st.mean(d):+.4f} ± {st.stdev(d):.4f}")
            else:
                cells.append("-")
        out.append(f"| {first} - {second} | " + " | ".join(cells) + " |")
(here / "seven_tasks.md").write_text("\n".join(out) + "\n")
print("\n".join(out))
