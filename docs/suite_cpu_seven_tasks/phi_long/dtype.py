"""momentum_dtype on the runs that resolve the floor-to-target gap (issue 17): the default
form at r8 and r32 with its first moment stored in float32 (table.py's 'floor0.4' rows,
bit-identical to the library's default) and bfloat16 (runs_dtype.jsonl: run.py row
'bf16'; 3 seeds on the lr grid of the float32 rows). Each at its lr with
the best mean validation loss, and the paired test-loss difference to float32 at float32's
lr (the same seeds, the same data order and projections: only the rounding differs).
Writes dtype.md and dtype.csv beside this file."""
import json, statistics as st

from table import best, by, here, write

for line in open(here / "runs_dtype.jsonl"):
    r = json.loads(line)
    by[(r["task"], r["scale"], r["rank"], r["row"])].setdefault(r["lr"], {})[r["seed"]] = r

TASKS = (("newslm", 2.0), ("cnnstream", 4.0), ("tabstream", 4.0))
ROWS = (("float32", "floor0.4"), ("bfloat16", "bf16"))
lines = ["| task | rank | momentum | lr (best) | state bytes | test loss | minus float32, paired at float32's lr |",
         "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
table = []
for task, scale in TASKS:
    for rank in (8, 32):
        ref = best((task, scale, rank, "floor0.4"))
        for dtype, row in ROWS:
            b = best((task, scale, rank, row))
            if b is None or ref is None:
                continue
            lr, seeds, edge = b
            t = [seeds[s]["test_loss"] for s in sorted(seeds)]
            same = by[(task, scale, rank, row)].get(ref[0], {})
            diff = ""
            if row != "floor0.4" and len(same) == 3:
                d = [same[s]["test_loss"] - ref[1][s]["test_loss"] for s in sorted(same)]
                diff = f"{st.mean(d):+.4f} ± {st.stdev(d):.4f}"
            state = next(iter(seeds.values()))["state_bytes"]
            lines.append(f"| {task} | {rank} | {dtype} | {lr:g}{f' ({edge} edge)' if edge else ''} | {state:,} | "
                         f"{st.mean(t):.4f} ± {st.stdev(t):.4f} | {diff} |")
            table.append(dict(task=task, rank=rank, momentum_dtype=dtype, lr=lr, lr_edge=edge, state_bytes=state,
                              test_loss_mean=st.mean(t), test_loss_std=st.stdev(t), minus_float32=diff))
write("dtype", lines, table)
