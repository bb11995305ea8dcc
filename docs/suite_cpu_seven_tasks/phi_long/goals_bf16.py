"""Issue 17's quality goals at the bfloat16 default (tenth session, 2026-12-02): the default
form at r8 and r32 with its momentum in bfloat16, rounded stochastically (runs_dtype_sr.jsonl,
run.py row 'bf16': the library's default "auto" on these tasks), against the floor
(Adafactor beta1=None) and the target (beta1=0.9) of table.py's runs, on the three runs
that resolve the floor-to-target gap. Each row at its lr with the best mean validation
loss; paired test-loss differences over the seeds both have, and the ratio of the means.
Prints; run from this folder."""
import json
import statistics as st

from table import best, by, here

for line in open(here / "runs_dtype_sr.jsonl"):
    r = json.loads(line)
    by[(r["task"], r["scale"], r["rank"], "bf16sr")].setdefault(r["lr"], {})[r["seed"]] = r
for task, scale in (("newslm", 2.0), ("cnnstream", 4.0), ("tabstream", 4.0)):
    floor, target = best((task, scale, None, "adafactor")), best((task, scale, None, "adafactor-b0.9"))
    for rank in (8, 32):
        lr, mine, edge = best((task, scale, rank, "bf16sr"))
        out = []
        for name, (_, ref, _) in (("floor", floor), ("target", target)):
            seeds = sorted(set(mine) & set(ref))
            d = [mine[s]["test_loss"] - ref[s]["test_loss"] for s in seeds]
            ratio = st.mean(mine[s]["test_loss"] for s in seeds) / st.mean(ref[s]["test_loss"] for s in seeds)
            out.append(f"vs {name} {st.mean(d):+.4f} ± {st.stdev(d):.4f} (ratio {ratio:.4f})")
        print(f"{task} r{rank} lr {lr:g}{f' ({edge} edge)' if edge else ''}: " + " | ".join(out))
