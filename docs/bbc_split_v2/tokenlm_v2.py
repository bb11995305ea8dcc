"""tokenlm on the split without its leak (2026-12-06, session 46): the floor, the target, r8
and r32 at the default, 3 seeds each at the lr each row chose on the old split (floor and
target 2e-3, r8 and r32 4e-3; not tuned again: a run trains on the same data as before, so
only the held-out scores move), against the old split's runs of the same rows, lrs and
seeds (../suite_default/runs_tokenlm.jsonl). Reads runs_tokenlm.jsonl beside this file,
made by two of these loops side by side (about 8-9 min a run on the 2-core CPU):

    export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 HF_HUB_OFFLINE=1
    python docs/suite_cpu_seven_tasks/phi_long/run.py runs/tokenlm-v2/runs_${ROW}_${RANK}_${LR}_${SEED}.jsonl \\
      tokenlm 1 $RANK $ROW $LR $SEED-$SEED       # ROW RANK LR: adafactor 8 2e-3, adafactor-b0.9 8 2e-3,
    cat runs/tokenlm-v2/*.jsonl | sort > docs/bbc_split_v2/runs_tokenlm.jsonl   # default 8 4e-3, default 32 4e-3
    python docs/bbc_split_v2/tokenlm_v2.py

Session 47 ran the same loop on seed 0 at each row's neighbouring lrs (floor and target
1e-3 and 4e-3, r8 and r32 2e-3 and 8e-3; SEED 0, "0-0"). Prints Markdown tables."""
import json
import statistics
from pathlib import Path

here = Path(__file__).parent
ROWS = {("adafactor", 2e-3): "floor", ("adafactor-b0.9", 2e-3): "target",
        ("flora-r8", 4e-3): "r8", ("flora-r32", 4e-3): "r32"}


def load(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        name = r.get("optimizer")
        row = ROWS.get((name, r["lr"]))
        if row and r.get("status", "ok") == "ok" and r["seed"] in (0, 1, 2):
            out.setdefault(row, {})[r["seed"]] = r["test_loss"]
    return out


def ms(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def paired(a, b):
    seeds = sorted(set(a) & set(b))
    return ms([a[s] - b[s] for s in seeds]) + (len(seeds),)


new, old = load(here / "runs_tokenlm.jsonl"), load(here.parent / "suite_default" / "runs_tokenlm.jsonl")
print("| row | old split: test loss | new split: test loss | new - old (paired) |")
print("| --- | ---: | ---: | ---: |")
for row in ("floor", "target", "r8", "r32"):
    n, o = new.get(row, {}), old.get(row, {})
    if not n:
        continue
    seeds = sorted(set(n) & set(o))
    mo, so = ms([o[s] for s in seeds])
    mn, sn = ms([n[s] for s in seeds])
    d, sd, k = paired(n, o)
    print(f"| {row} | {mo:.4f} ± {so:.4f} | {mn:.4f} ± {sn:.4f} | {d:+.4f} ± {sd:.4f} ({k} seeds) |")
print()
print("| goal | old split | new split |")
print("| --- | ---: | ---: |")
for name, a, b in (("target - floor", "target", "floor"), ("r8 - floor", "r8", "floor"),
                   ("r32 - target", "r32", "target"), ("r8 - target", "r8", "target")):
    cells = []
    for runs in (old, new):
        if a in runs and b in runs:
            d, sd, k = paired(runs[a], runs[b])
            cells.append(f"{d:+.4f} ± {sd:.4f} ({k})")
        else:
            cells.append("-")
    print(f"| {name} | {cells[0]} | {cells[1]} |")

# The lr grid on seed 0 (session 47: each row's neighbouring lrs, a factor of 2 either side,
# run on the new split as on the old): is each row's lr still its best?
NAMES = {"adafactor": "floor", "adafactor-b0.9": "target", "flora-r8": "r8", "flora-r32": "r32"}


def grid(path):
    out = {}
    for line in open(path):
        r = json.loads(line)
        if r.get("status", "ok") == "ok" and r["seed"] == 0 and r.get("optimizer") in NAMES:
            out.setdefault(NAMES[r["optimizer"]], {})[r["lr"]] = r["test_loss"]
    return out


new_grid, old_grid = grid(here / "runs_tokenlm.jsonl"), grid(here.parent / "suite_default" / "runs_tokenlm.jsonl")
print()
print("| row (seed 0) | lr | old split: test loss | new split: test loss |")
print("| --- | ---: | ---: | ---: |")
for row in ("floor", "target", "r8", "r32"):
    lrs = sorted(new_grid.get(row, {}))
    best = min(lrs, key=lambda lr: new_grid[row][lr]) if lrs else None
    for lr in lrs:
        o = old_grid.get(row, {}).get(lr)
        n = new_grid[row][lr]
        mark = "**" if lr == best else ""
        print(f"| {row} | {lr:g} | {'-' if o is None else f'{o:.4f}'} | {mark}{n:.4f}{mark} |")
