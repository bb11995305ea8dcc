"""Why momentum loses to no momentum on cnn and tabular: held-out loss along training.

Reruns chosen (task, optimizer) pairs of a finished suite at their chosen lr, scoring
every ``--every`` steps on the training split (where the task has a fixed one), the
validation and the test split, and draws two figures:

- ``curves.png``: test loss (solid) and training-split loss (dashed) against step, mean
  over seeds, one panel a task;
- ``train_vs_test.png``: from the suite's own ``runs.jsonl`` (no new runs), each
  (optimizer, lr, seed)'s final test loss against its training loss (mean of the last
  10% of mini-batch losses), one panel a task.

    python -m flora.bench.suite.curves --suite runs/suite --tasks cnn,tabular --out runs/suite-curves

One process, one thread: a CPU-sized investigation, not part of the ranking.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import runner, score, space

OPTIMIZERS = (space.FLOOR, space.TARGET, score.DEFAULT_ROWS[0])


def suite_kappa(suite: Path) -> int:
    """The suite's primary kappa (its --kappas' first, as its report used): from its
    meta, else the one kappa of its chosen rows, else the library's. With the library's
    always, a kappa-1000 suite had no chosen lr: nothing ran, and nothing said so (probe Z80)."""
    res = json.loads((suite / "results.json").read_text())
    if (res.get("meta") or {}).get("kappas"):
        return int(res["meta"]["kappas"][0])
    held = {c["kappa"] for c in res["chosen"]}
    return int(held.pop()) if len(held) == 1 else space.KAPPA


def chosen_lrs(suite: Path, kappa: int = space.KAPPA) -> dict[tuple[str, str], float]:
    res = json.loads((suite / "results.json").read_text())
    return {(c["task"], c["optimizer"]): c["lr"] for c in res["chosen"] if c["kappa"] == kappa}


def run(suite: Path, tasks, optimizers, seeds: int, every: int, out: Path, data: Path,
        kappa: int | None = None) -> list[dict]:
    import torch

    kappa = suite_kappa(suite) if kappa is None else kappa
    lrs = chosen_lrs(suite, kappa)
    if not any((t, o) in lrs for t in tasks for o in optimizers):
        raise SystemExit(f"{suite / 'results.json'} chose no lr at kappa {kappa} for tasks {', '.join(tasks)} "
                         f"and optimizers {', '.join(optimizers)}: nothing to run")
    runner._init(str(data), "cpu", 1.0, 1)
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "curves.jsonl"
    done = {r["key"] for r in runner.read_log(log)}
    rows = runner.read_log(log)
    with open(log, "a") as f:
        for task in tasks:
            for opt in optimizers:
                if (task, opt) not in lrs:
                    continue
                for seed in range(seeds):
                    job = space.Job(task, opt, lrs[(task, opt)], seed, kappa)
                    if job.key in done:
                        continue
                    row = runner.run_job(job, curve_every=every)
                    rows.append(row)
                    f.write(json.dumps(row) + "\n")
                    f.flush()
    return rows


def _mean_curve(rows, key, start=0):
    import numpy as np

    keep = [i for i, p in enumerate(rows[0]["curve"]) if p["step"] >= start]
    steps = [rows[0]["curve"][i]["step"] for i in keep]
    vals = np.array([[r["curve"][i].get(key, np.nan) for i in keep] for r in rows], dtype=float)
    return steps, vals.mean(0)


def early_stopped(rows: list[dict]) -> list[dict]:
    """Per (task, optimizer): the final test loss against the test loss at the step of
    least validation loss (early stopping), mean ± std over seeds."""
    import statistics

    out = []
    for task, opt in sorted({(r["task"], r["optimizer"]) for r in rows}, key=lambda k: k[0]):
        rs = [r for r in rows if r["task"] == task and r["optimizer"] == opt and r.get("curve")]
        final = [r["curve"][-1]["test_loss"] for r in rs]
        best = [min(r["curve"], key=lambda p: p["val_loss"]) for r in rs]
        train = [r["curve"][-1].get("train_loss") for r in rs]
        sd = (lambda x: statistics.stdev(x) if len(x) > 1 else None)  # one seed: spread unknown
        out.append({"task": task, "optimizer": opt, "lr": rs[0]["lr"], "seeds": len(rs),
                    "final_test": statistics.fmean(final), "final_test_std": sd(final),
                    "stopped_test": statistics.fmean(p["test_loss"] for p in best),
                    "stopped_test_std": sd([p["test_loss"] for p in best]),
                    "stopped_step": statistics.fmean(p["step"] for p in best),
                    "final_train": statistics.fmean(train) if None not in train else None})
    return out


def _panels(plt, tasks):
    """A figure of one panel a task, three to a row: (figure, [(axes, task)])."""
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    return fig, list(zip(axes.flat, tasks))


def plot_curves(path: Path, rows: list[dict], tasks, optimizers) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in tasks if any(r["task"] == t for r in rows)]
    if not tasks:
        return
    fig, panels = _panels(plt, tasks)
    for ax, task in panels:
        for i, opt in enumerate(optimizers):
            rs = [r for r in rows if r["task"] == task and r["optimizer"] == opt and r.get("curve")]
            if not rs:
                continue
            color = f"C{i}"
            steps, test = _mean_curve(rs, "test_loss", start=100)
            ax.plot(steps, test, color=color, label=f"{opt} lr {rs[0]['lr']:g} (test)")
            if "train_loss" in rs[0]["curve"][0]:
                steps, train = _mean_curve(rs, "train_loss", start=100)
                ax.plot(steps, train, color=color, linestyle="--", linewidth=1)
        low, high = ax.get_ylim()
        if high > 4 * low:  # a wide range: label the decades only
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{task}: test (solid), training split (dashed), from step 100", fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(1.2, 1.4, 1.6, 1.8, 3.0, 4.0, 6.0, 8.0)))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_train_vs_test(path: Path, runs: list[dict], tasks, kappa: int = space.KAPPA) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r.get("status") == "ok" and r.get("kappa", space.KAPPA) == kappa
            and r.get("train_loss") is not None and r.get("test_loss") is not None]  # a non-finite tail: null
    tasks = [t for t in tasks if any(r["task"] == t for r in runs)]
    if not tasks:
        return
    groups = [("floor", lambda o: o == space.FLOOR, "k", "o"), ("target", lambda o: o == space.TARGET, "C3", "s"),
              ("Flora r8", lambda o: o.startswith("flora-r8-"), "C0", "^"),
              ("Flora r32", lambda o: o.startswith("flora-r32-"), "C2", "v")]
    import numpy as np

    fig, panels = _panels(plt, tasks)
    for ax, task in panels:
        rs = [r for r in runs if r["task"] == task]
        for name, pick, color, marker in groups:
            sel = [r for r in rs if pick(r["optimizer"])]
            ax.scatter([r["train_loss"] for r in sel], [r["test_loss"] for r in sel], s=10, c=color, marker=marker,
                       label=name, alpha=0.6)
        test = np.array([r["test_loss"] for r in rs])
        train = np.array([r["train_loss"] for r in rs])
        # the better 80% of the runs: the high-lr and low-lr tails would flatten the interesting part
        ax.set_ylim(test.min() - 0.05 * (np.quantile(test, 0.8) - test.min()), np.quantile(test, 0.8))
        ax.set_xlim(train.min() - 0.05 * (np.quantile(train, 0.8) - train.min()), np.quantile(train, 0.8))
        ax.set_xlabel("training loss (last 10% of steps)")
        ax.set_ylabel("test loss")
        ax.set_title(f"{task}: every lr and seed, kappa {kappa}", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, help="a suite folder with results.json and runs.jsonl")
    p.add_argument("--tasks", default="cnn,tabular")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--data", default="runs/suite-data")
    p.add_argument("--out", default="runs/suite-curves")
    p.add_argument("--plots-only", action="store_true")
    p.add_argument("--kappa", type=int, default=None, help="the chosen lrs of this kappa (default: the suite's "
                   "primary kappa, from its results.json)")
    a = p.parse_args(argv)
    suite, out = Path(a.suite), Path(a.out)
    tasks, opts = a.tasks.split(","), a.optimizers.split(",")
    kappa = suite_kappa(suite) if a.kappa is None else a.kappa
    if a.plots_only:
        rows = runner.read_log(out / "curves.jsonl")
    else:
        rows = run(suite, tasks, opts, a.seeds, a.every, out, Path(a.data), kappa)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(out / "curves.png", rows, tasks, opts)
    stopped = early_stopped(rows)
    (out / "early_stopped.json").write_text(json.dumps(stopped, indent=1))
    def pm(m, s):
        return f"{m:.4f}" + ("" if s is None else f" ± {s:.4f}")
    for e in stopped:
        print(f"{e['task']:10s} {e['optimizer']:30s} lr {e['lr']:<7g} final test {pm(e['final_test'], e['final_test_std'])}"
              f"  early-stopped {pm(e['stopped_test'], e['stopped_test_std'])} "
              f"(step {e['stopped_step']:.0f})  final train-split {e['final_train']}")
    plot_train_vs_test(out / "train_vs_test.png", runner.read_log(suite / "runs.jsonl"), tasks, kappa)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
