"""Issue 17, twelfth session (2026-12-02): the library's default (floored form, kappa 100,
bfloat16 momentum; flora-bench's `flora-rR-floored-orthonormal`) at ranks 8 and 32 against
the floor (Adafactor beta1=None) and the target (beta1=0.9) on three of the four suite tasks
that had only the GPU's seed 0 of older defaults: finetune and bytelm (twelfth session) and
classify (thirteenth, which also ran bytelm's lrs sqrt(2) apart around each row's best),
3 seeds each (0-2), on the 2-core CPU (runs.jsonl, written by `flora-bench suite`; the
commands are in docs/results.md). Each row at the lr with the best mean validation loss over the seeds
(the suite's rule); test loss mean ± std; paired differences to the floor and the target
over the seeds; and, where a row's chosen lr also ran on seeds 3-5 (bytelm's floor and r8),
the paired difference over all six. Writes table.md, table.csv and lr_curves.png; run from
anywhere."""
import collections
import csv
import json
import statistics as st
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flora.bench.suite import score  # noqa: E402

here = Path(__file__).parent
ROWS = {"adafactor": "floor (Adafactor beta1=None)", "adafactor-b0.9": "target (beta1=0.9)",
        "flora-r8-floored-orthonormal": "Flora r8 (default)", "flora-r32-floored-orthonormal": "Flora r32 (default)"}
runs = collections.defaultdict(lambda: collections.defaultdict(dict))  # (task, opt) -> lr -> seed -> run
for line in open(here / "runs.jsonl"):
    r = json.loads(line)
    if r.get("status") == "ok" and r["optimizer"] in ROWS and r["seed"] < 3:  # seeds 3-5: the note at the end
        runs[(r["task"], r["optimizer"])][r["lr"]][r["seed"]] = r


# the suite's own scoring: each (task, row) at the lr with the best mean validation loss
CHOSEN = {(c["task"], c["optimizer"]): c for c in score.choose(
    [r for grid in runs.values() for seeds in grid.values() for r in seeds.values()])}


def best(task, opt):
    """(lr, {seed: run}, 'lower'/'upper'/None): score.choose's lr, its runs, and whether it is
    an end of the grid."""
    c = CHOSEN[(task, opt)]
    return c["lr"], runs[(task, opt)][c["lr"]], {"low": "lower", "high": "upper"}.get(c["edge"])


def paired(mine, ref):
    """mine - ref (test loss) over the seeds both ran ({seed: run} each): score.paired."""
    m, s, n = score.paired(*({"per_seed": {k: r["test_loss"] for k, r in x.items()}} for x in (mine, ref)))
    return m, (float("nan") if s is None else s), n


# the tasks where all four rows ran
tasks = sorted(t for t in {t for t, _ in runs} if all(runs.get((t, o)) for o in ROWS))
lines = ["| task | row | lr (grid) | seeds | test loss | / floor | - floor, paired | - target, paired | state, % of AdamW's |",
         "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
table = []
for task in tasks:
    floor, target = best(task, "adafactor"), best(task, "adafactor-b0.9")
    adamw = None  # AdamW's state: 2 float32 per parameter
    for opt, name in ROWS.items():
        if (task, opt) not in runs:
            continue
        lr, mine, edge = best(task, opt)
        losses = [r["test_loss"] for r in mine.values()]
        any_run = next(iter(mine.values()))
        adamw = adamw or 8 * any_run["params"]
        df, sf, _ = paired(mine, floor[1])
        dt, stt, _ = paired(mine, target[1])
        ratio = st.mean(losses) / st.mean(r["test_loss"] for r in floor[1].values())
        grid = ", ".join(f"{x:g}" for x in sorted(runs[(task, opt)]))
        row = dict(task=task, row=name, lr=lr, edge=edge or "", grid=grid, seeds=len(losses),
                   test_mean=st.mean(losses), test_std=st.stdev(losses) if len(losses) > 1 else float("nan"),
                   ratio_floor=ratio, minus_floor=df, minus_floor_std=sf, minus_target=dt, minus_target_std=stt,
                   state_pct=100 * any_run["state_bytes"] / adamw)
        table.append(row)
        lines.append(f"| {task} | {name} | {lr:g}{' (' + edge + ' end)' if edge else ''} ({grid}) | {len(losses)} | "
                     f"{row['test_mean']:.4f} ± {row['test_std']:.4f} | {ratio:.3f} | "
                     + ("" if opt == "adafactor" else f"{df:+.4f} ± {sf:.4f}") + " | "
                     + ("" if opt == "adafactor-b0.9" else f"{dt:+.4f} ± {stt:.4f}") + f" | {row['state_pct']:.1f}% |")
six = collections.defaultdict(dict)  # (task, opt, lr) -> seed -> run, every seed
for line in open(here / "runs.jsonl"):
    r = json.loads(line)
    if r.get("status") == "ok" and r["optimizer"] in ROWS:
        six[(r["task"], r["optimizer"], r["lr"])][r["seed"]] = r
notes = []
for task in tasks:
    chosen = {opt: best(task, opt)[0] for opt in ROWS}
    for a in ROWS:
        for b in ("adafactor", "adafactor-b0.9"):
            x, y = six[(task, a, chosen[a])], six[(task, b, chosen[b])]
            d, s, n = paired(x, y) if a != b else (0, 0, 0)
            if n > 3:
                notes.append(f"- {task}: {ROWS[a]} minus {ROWS[b]}, paired over seeds 0-{n - 1} at the chosen lrs: "
                             f"{d:+.4f} ± {s:.4f} (standard error {s / n ** 0.5:.4f})")
lines += [""] + notes if notes else []
(here / "table.md").write_text("\n".join(lines) + "\n")
with open(here / "table.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(table[0]))
    w.writeheader()
    w.writerows(table)
fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
for ax, task in zip(axes[0], tasks):
    for opt, name in ROWS.items():
        grid = runs.get((task, opt))
        if not grid:
            continue
        lrs = sorted(grid)
        m = [st.mean(r["test_loss"] for r in grid[x].values()) for x in lrs]
        s = [st.stdev([r["test_loss"] for r in grid[x].values()]) if len(grid[x]) > 1 else 0 for x in lrs]
        ax.errorbar(lrs, m, yerr=s, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the log axis' minor labels overlap
    ax.set_xlabel("lr")
    ax.set_ylabel("test loss (mean ± std over seeds)")
    ax.set_title(f"{task}, 2-core CPU")
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(here / "lr_curves.png", dpi=110)
print("\n".join(lines))
