"""Each (optimizer, lr) of this folder's run, mean ± std over its seeds: a Markdown table
(lr_table.md) and a figure of test loss against lr (lr_curves.png). The run:
``flora-bench train --tasks classify --tau 2 --optimizers adafactor,adafactor-b0.9,flora-r8,
flora-r8+ca-r8,flora-r8+ca-r32 --seeds 3``."""

import collections
import csv
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
KEYS = ("val_loss", "val_accuracy", "test_loss", "test_accuracy")


def main() -> None:
    groups = collections.defaultdict(list)
    with open(HERE / "runs.csv") as f:
        for r in csv.DictReader(f):
            if r["status"] == "ok":
                groups[r["optimizer"], float(r["lr"])].append(r)
    lines = ["| optimizer | lr | seeds | " + " | ".join(k.replace("_", " ") for k in KEYS) + " |",
             "| --- | ---: | ---: |" + " ---: |" * len(KEYS)]
    curves = collections.defaultdict(list)
    for (opt, lr), runs in sorted(groups.items()):
        cells = []
        for k in KEYS:
            v = [float(r[k]) for r in runs]
            cells.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}")
        lines.append(f"| {opt} | {lr:g} | {len(runs)} | " + " | ".join(cells) + " |")
        t = [float(r["test_loss"]) for r in runs]
        curves[opt].append((lr, statistics.mean(t), statistics.stdev(t)))
    (HERE / "lr_table.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for opt, pts in curves.items():  # the seeds' spread as a band
        lrs, means, stds = (list(c) for c in zip(*pts))
        ax.fill_between(lrs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
        ax.plot(lrs, means, marker="o", label=opt)
    ax.set(xscale="log", xlabel="lr", ylabel="test loss (mean ± std, 3 seeds)",
           title="MiniLM on BBC, tau=2: test loss against lr")
    ax.legend(fontsize=8)
    fig.savefig(HERE / "lr_curves.png", dpi=120, bbox_inches="tight")

if __name__ == "__main__":
    main()
