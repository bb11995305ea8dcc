"""cnn (the suite's 1,078-image CNN, 1x) with 10 seeds: seeds 0-2 from the suite and
constant_phi runs, 3-9 from runs_cnn_seeds.jsonl; each row at the lr its 3-seed grid chose
(8e-3 for all but r32 'scaled', 4e-3... as printed). Test loss mean ± std, and the paired
difference fixed 0.4 minus scaled."""
import json, statistics as st
from pathlib import Path

here = Path(__file__).parent
vals = {}  # (row, lr) -> seed -> test loss


def add(row, lr, seed, t):
    vals.setdefault((row, lr), {})[seed] = t


for line in open(here.parent / "runs.jsonl"):
    r = json.loads(line)
    if r["task"] != "cnn" or r.get("status") != "ok":
        continue
    o = r["optimizer"]
    if o.startswith("adafactor"):
        add(o, r["lr"], r["seed"], r["test_loss"])
    elif r.get("kappa") == 100 and o.endswith("-scaled-orthonormal"):
        add(o.split("-")[1] + "-scaled", r["lr"], r["seed"], r["test_loss"])
for line in open(here.parent / "constant_phi_runs.jsonl"):
    r = json.loads(line)
    if r["task"] == "cnn" and r["phi"] == 0.4:
        add(f"r{r.get('rank', 8)}-fixed", r["lr"], r["seed"], r["test_loss"])
for line in open(here / "runs_cnn_seeds.jsonl"):
    r = json.loads(line)
    row = r["row"] if r["row"].startswith("adafactor") else f"r{r['rank']}-" + ("fixed" if r["row"] == "0.4" else r["row"])
    add(row, r["lr"], r["seed"], r["test_loss"])
out = ["| row | lr | seeds | test loss | / floor |", "| --- | ---: | ---: | ---: | ---: |"]
floor = st.mean(vals[("adafactor", 8e-3)].values())
for (row, lr), s in sorted(vals.items()):
    if len(s) >= 10:
        t = [s[i] for i in range(10)]
        out.append(f"| {row} | {lr:g} | 10 | {st.mean(t):.4f} ± {st.stdev(t):.4f} | {st.mean(t) / floor:.3f} |")
out += ["", "| paired, 10 seeds, same lr | difference |", "| --- | ---: |"]
for rank in (8, 32):
    for lr in (4e-3, 8e-3):
        a, b = vals.get((f"r{rank}-fixed", lr), {}), vals.get((f"r{rank}-scaled", lr), {})
        if len(a) >= 10 and len(b) >= 10:
            d = [a[i] - b[i] for i in range(10)]
            out.append(f"| r{rank} fixed 0.4 - scaled, lr {lr:g} | {st.mean(d):+.4f} ± {st.stdev(d):.4f} |")
(here / "cnn_seeds.md").write_text("\n".join(out) + "\n")
print("\n".join(out))
