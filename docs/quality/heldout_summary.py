"""Mean ± std over seeds per row and lr, and each row's best lr with its paired differences to
the floor and the target (usage: python docs/quality/heldout_summary.py RUNS.jsonl)."""
import json, collections, statistics as st, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
by = collections.defaultdict(dict)
for r in rs: by[(r["row"], r["lr"])][r["seed"]] = r["test"]
rows = ["floor", "target", "r8", "r32"]
print("row lr: mean ± std (n)")
best = {}
for row in rows:
    lrs = sorted(lr for (rw, lr) in by if rw == row)
    for lr in lrs:
        v = list(by[(row, lr)].values())
        m = st.mean(v); s = st.stdev(v) if len(v) > 1 else 0
        print(f"{row:7s} {lr:8.2e} {m:.5f} ± {s:.5f} ({len(v)})")
        if len(v) == 3 and (row not in best or m < best[row][1]): best[row] = (lr, m, s, by[(row, lr)])
print()
for row in rows:
    if row in best:
        lr, m, s, seeds = best[row]
        lrs = sorted(l for (rw, l) in by if rw == row)
        edge = lr in (lrs[0], lrs[-1])
        line = f"{row:7s} best lr {lr:.2e}{' (EDGE)' if edge else ''}: {m:.5f} ± {s:.5f}"
        for ref in ("floor", "target"):
            if ref in best and ref != row:
                d = [seeds[k] - best[ref][3][k] for k in seeds]
                line += f" | - {ref}: {st.mean(d):+.5f} ± {st.stdev(d):.5f}"
        print(line)
