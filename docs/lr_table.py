"""Each (optimizer, lr) of a ``flora-bench train --seeds N`` run folder, mean ± std over
its seeds: a Markdown table (lr_table.md) and a figure of test loss against lr
(lr_curves.png), written into the folder. Used for docs/accum_classify_cpu and
docs/accum_pretrain_cpu (compressed accumulation at tau 2; their results.md give the
commands)::

    python docs/lr_table.py docs/accum_pretrain_cpu
"""

import collections
import csv
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KEYS = ("val_loss", "val_accuracy", "test_loss", "test_accuracy")


def _cell(runs: list, key: str) -> str:
    v = [float(r[key]) for r in runs if r.get(key) not in (None, "")]
    if not v:
        return "-"
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def main(folder: Path) -> None:
    groups = collections.defaultdict(list)
    with open(folder / "runs.csv") as f:
        for r in csv.DictReader(f):
            if r["status"] == "ok":
                groups[r["task"], r["optimizer"], float(r["lr"])].append(r)
    keys = [k for k in KEYS if any(r.get(k) for runs in groups.values() for r in runs)]
    lines = ["| task | optimizer | lr | seeds | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "| --- | --- | ---: | ---: |" + " ---: |" * len(keys)]
    curves = collections.defaultdict(list)
    for (task, opt, lr), runs in sorted(groups.items()):
        lines.append(f"| {task} | {opt} | {lr:g} | {len(runs)} | " + " | ".join(_cell(runs, k) for k in keys) + " |")
        t = [float(r["test_loss"]) for r in runs]
        curves[task, opt].append((lr, statistics.mean(t), statistics.stdev(t) if len(t) > 1 else 0.0))
    (folder / "lr_table.md").write_text("\n".join(lines) + "\n")
    taus = ", ".join(sorted({r.get("tau") or "?" for runs in groups.values() for r in runs}))
    fig, ax = plt.subplots(figsize=(6, 4))
    for (task, opt), pts in curves.items():  # the seeds' spread as a band
        lrs, means, stds = (list(c) for c in zip(*pts))
        ax.fill_between(lrs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
        ax.plot(lrs, means, marker="o", label=opt if len({k[0] for k in curves}) == 1 else f"{task}: {opt}")
    tasks = ", ".join(sorted({k[0] for k in curves}))
    ax.set(xscale="log", xlabel="lr", ylabel="test loss (mean ± std over seeds)",
           title=f"{tasks}, tau={taus}: test loss against lr")
    ax.legend(fontsize=8)
    fig.savefig(folder / "lr_curves.png", dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("."))
