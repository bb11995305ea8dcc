"""momentum_dtype on the runs that resolve the floor-to-target gap (issue 17): the default
form at r8 and r32 with its first moment stored in float32 (table.py's 'floor0.4' rows,
bit-identical to the library's default) and bfloat16 (runs_dtype.jsonl: run.py row
'bf16'; 3 seeds on the lr grid of the float32 rows); on the other four tasks of the
CPU suite at scale 1 (runs_dtype_1x.jsonl, seventh session: run.py rows 'default' and
'bf16', 3 seeds, the float32 default's best lr in runs_1x.jsonl and its two neighbours).
Each at its lr with
the best mean validation loss, and the paired test-loss difference to float32 at float32's
lr (the same seeds, the same data order and projections: only the rounding differs).
The bfloat16 rows of runs_dtype.jsonl rounded to nearest (before 2026-12-02); those of
runs_dtype_sr.jsonl (run.py row 'bf16' with the library's stochastic rounding, read here
as row 'bf16sr') on the three longer tasks, and of runs_dtype_1x_sr.jsonl on the other four
(tenth session, 2026-12-02: the library's default since then, "auto", on these tasks).
Writes dtype.md and dtype.csv beside this file."""
import json, statistics as st

from table import best, by, here, write

for name in ("runs_dtype.jsonl", "runs_dtype_1x.jsonl", "runs_dtype_sr.jsonl", "runs_dtype_1x_sr.jsonl"):
    for line in open(here / name):
        r = json.loads(line)
        row = "bf16sr" if name.endswith("_sr.jsonl") else r["row"]
        by[(r["task"], r["scale"], r["rank"], row)].setdefault(r["lr"], {})[r["seed"]] = r

# (task, scale, the float32 row): 'floor0.4' (table.py's runs) or 'default' (run beside bf16)
TASKS = (("newslm", 2.0, "floor0.4"), ("cnnstream", 4.0, "floor0.4"), ("tabstream", 4.0, "floor0.4"),
         ("cnn", 1.0, "default"), ("stream", 1.0, "default"), ("tabular", 1.0, "default"), ("vit", 1.0, "default"))
lines = ["| task | rank | momentum | lr (best) | state bytes | test loss | minus float32, paired at float32's lr |",
         "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
table = []
for task, scale, f32 in TASKS:
    for rank in (8, 32):
        ref = best((task, scale, rank, f32))
        for dtype, row in (("float32", f32), ("bfloat16, to nearest", "bf16"), ("bfloat16, stochastic", "bf16sr")):
            b = best((task, scale, rank, row))
            if b is None or ref is None:
                continue
            lr, seeds, edge = b
            t = [seeds[s]["test_loss"] for s in sorted(seeds)]
            same = by[(task, scale, rank, row)].get(ref[0], {})
            diff = ""
            if row != f32 and len(same) == 3:
                d = [same[s]["test_loss"] - ref[1][s]["test_loss"] for s in sorted(same)]
                diff = f"{st.mean(d):+.4f} ± {st.stdev(d):.4f}"
            state = next(iter(seeds.values()))["state_bytes"]
            lines.append(f"| {task}{'' if scale == 1 else f' (x{scale:g})'} | {rank} | {dtype} | {lr:g}{f' ({edge} edge)' if edge else ''} | {state:,} | "
                         f"{st.mean(t):.4f} ± {st.stdev(t):.4f} | {diff} |")
            table.append(dict(task=task, rank=rank, momentum_dtype=dtype, lr=lr, lr_edge=edge, state_bytes=state,
                              test_loss_mean=st.mean(t), test_loss_std=st.stdev(t), minus_float32=diff))
# vit r8 at lr 0.002 with seeds 3-8 too (runs_vit_seeds.jsonl, tenth session: run.py rows 'fp32' and
# 'bf16'), paired over 9 seeds: its 3-seed difference above is inside a spread of 0.1-0.2
f32 = {s: r["test_loss"] for s, r in by[("vit", 1.0, 8, "default")].get(0.002, {}).items()}
b16 = {s: r["test_loss"] for s, r in by[("vit", 1.0, 8, "bf16sr")].get(0.002, {}).items()}
for line in open(here / "runs_vit_seeds.jsonl"):
    r = json.loads(line)
    (f32 if r["row"] == "fp32" else b16)[r["seed"]] = r["test_loss"]
d = [b16[s] - f32[s] for s in sorted(f32) if s in b16]
lines += ["", f"vit r8, lr 0.002, seeds {min(f32)}-{max(f32)}: float32 {st.mean(f32.values()):.4f} ± "
          f"{st.stdev(f32.values()):.4f}, bfloat16 stochastic {st.mean(b16.values()):.4f} ± {st.stdev(b16.values()):.4f}; "
          f"paired {st.mean(d):+.4f} ± {st.stdev(d):.4f} (standard error {st.stdev(d) / len(d) ** 0.5:.4f}, {len(d)} seeds)"]
write("dtype", lines, table)
