"""Tables for the kind-of-layer experiment (run.py; seventeenth session, 2026-12-02): each
row at each lr (mean test loss over its seeds), each row at the lr with the best mean
validation loss, and its paired test-loss difference (same seeds) to the default r8 and to
the target at their own best lrs (rank 32 rows from runs_r32.jsonl, marked @r32; rows KIND*F, lr x F on that kind: also to the floor and
the target with the same lrs, rows F:KIND*F and T:KIND*F). Reference rows come from the runs that made them:
newslm 1x: ../runs_1x.jsonl (default r8) and ../../suite_cpu_seven_tasks/runs.jsonl
(floor, target, 'exact' r8 at kappa 100, momentum in float32); bytelm 1x:
../../suite_cpu_big_tasks/runs.jsonl (floor, target, the default r8 with its momentum in
float32); bytelm 2x: ../runs_bytelm2x.jsonl; tabular 1x: runs_tabular.jsonl (every row of it, the
default included) and ../../suite_cpu_seven_tasks/runs.jsonl (floor, target). Writes kind.md beside this file."""
import collections
import json
import statistics
from pathlib import Path

here = Path(__file__).parent
docs = here.parent.parent
rows = collections.defaultdict(lambda: collections.defaultdict(dict))  # (task, scale, row) -> lr -> seed -> run


def add(path, scale, name_of):
    for line in open(path):
        r = json.loads(line)
        name = name_of(r)
        if name and r.get("status", "ok") == "ok" and r.get("scale", scale) == scale and r["seed"] in (0, 1, 2):
            rows[(r["task"], scale, name)][float(f"{r['lr']:.3g}")][r["seed"]] = r  # 1.41e-3 is 1.4142e-3


def reference(r):
    o, row = r["optimizer"], r.get("row")
    if o in ("adafactor", "adafactor-b0.9") and (row is None or row == o):
        return {"adafactor": "floor", "adafactor-b0.9": "target"}[o]
    if row in ("default", "exact") and r.get("rank") == 8:
        return f"{row} (all)" if row == "exact" else "default"
    if r.get("kappa") == 100 and o == "flora-r8-exact-orthonormal":
        return "exact (all)"
    if r.get("kappa") == 100 and o == "flora-r8-floored-orthonormal":
        return "default"
    return None


def kind_row(r):
    return "exact (all)" if r["row"] == "all" else r["row"]


for scale, paths in ((1.0, [docs / "suite_cpu_seven_tasks" / "runs.jsonl", here.parent / "runs_1x.jsonl",
                            docs / "suite_cpu_big_tasks" / "runs.jsonl"]),
                     (2.0, [here.parent / "runs_bytelm2x.jsonl"])):
    for p in paths:
        add(p, scale, lambda r: reference(r) if r["task"] in ("newslm", "bytelm")
            else reference(r) if r["task"] == "tabular" and reference(r) in ("floor", "target") else None)
for scale in (1.0, 2.0):
    add(here / "runs.jsonl", scale, kind_row)
    add(here / "runs_r32.jsonl", scale, lambda r: f"{kind_row(r)} @r32")  # rank 32, kept apart from the rank-8 file
# the tabular MLP's layers (thirty-second session): 'none' is the default row there
add(here / "runs_tabular.jsonl", 1.0, lambda r: "default" if r["row"] == "none" else kind_row(r))


def best(task, scale, name):
    """(lr, {seed: test loss}) at the lr with the best mean validation loss over 2+ seeds
    (one seed where no lr has more)."""
    by_lr = rows[(task, scale, name)]
    most = max(len(s) for s in by_lr.values())
    lr = min((lr for lr, s in by_lr.items() if len(s) == most),
             key=lambda lr: statistics.mean(r["val_loss"] for r in by_lr[lr].values()))
    return lr, {seed: r["test_loss"] for seed, r in by_lr[lr].items()}


def paired(a, b):
    common = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in common]
    if not d:
        return "-"
    return f"{statistics.mean(d):+.4f}" + (f" ± {statistics.stdev(d):.4f}" if len(d) > 1 else "") + f" ({len(d)})"


lines = []
for task, scale in sorted({(t, s) for t, s, _ in rows}):
    names = sorted(n for t, s, n in rows if (t, s) == (task, scale))
    lrs = sorted({lr for n in names for lr in rows[(task, scale, n)]})
    r32 = " (rows marked @r32: rank 32)" if any(n.endswith("@r32") for n in names) else ""
    lines += [f"### {task}, {scale:g}x, rank 8{r32}", "",
              "| row | " + " | ".join(f"{lr:g}" for lr in lrs)
              + " | best lr | test loss | - default | - target | - floor, same lrs | - target, same lrs |",
              "| --- |" + " ---: |" * (len(lrs) + 6)]
    ref = {n: best(task, scale, n)[1] for n in ("default", "target") if (task, scale, n) in rows}
    for n in names:
        by_lr = rows[(task, scale, n)]
        cells = [f"{statistics.mean(r['test_loss'] for r in by_lr[lr].values()):.4f} ({len(by_lr[lr])})"
                 if lr in by_lr else "" for lr in lrs]
        lr, test = best(task, scale, n)
        mean = statistics.mean(test.values())
        spread = f" ± {statistics.stdev(test.values()):.4f}" if len(test) > 1 else ""
        diffs = [paired(test, ref[k]) if k in ref and k != n else "" for k in ("default", "target")]
        rule = n.split(":")[-1].removesuffix(" @r32")
        for same in ("F:" + rule, "T:" + rule):  # the floor, the target with this row's lrs
            diffs.append(paired(test, best(task, scale, same)[1]) if "*" in n and same != n
                         and (task, scale, same) in rows else "")
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {lr:g} | {mean:.4f}{spread} | " + " | ".join(diffs) + " |")
    lines.append("")
lines.append("Cells: mean test loss over the seeds run (their count in brackets). Best lr: the best mean validation "
             "loss among the lrs with the most seeds. Differences: paired over common seeds, mean ± std (count).")
(here / "kind.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
