"""Choosing each optimizer's lr on the validation split, and writing the results:
JSON, CSV, a Markdown table, PNG plots, and a table on the terminal."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

MiB = 2**20


def _ok(r: dict) -> bool:
    return r.get("status") == "ok"


def val_score(r: dict, metric: str) -> float:
    """Higher is better; failed or diverged runs score -inf."""
    if not _ok(r):
        return -math.inf
    v = r.get(f"val_{metric}")
    if v is None or not math.isfinite(v):
        return -math.inf
    return v if metric == "accuracy" else -v


def choose(runs: list[dict], metrics: dict[str, str]) -> list[dict]:
    """One row per (task, optimizer): the lr with the best validation score."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["optimizer"]), []).append(r)
    rows = []
    for (task, name), rs in groups.items():
        best = max(rs, key=lambda r: val_score(r, metrics[task]))
        row = {k: v for k, v in best.items() if k not in ("curves", "traceback")}
        row["lrs_tried"] = [r["lr"] for r in rs]
        if not _ok(best):
            statuses = sorted({r["status"] for r in rs})
            row["status"] = statuses[0] if len(statuses) == 1 else "; ".join(statuses)
        rows.append(row)
    for task in {r["task"] for r in rows}:
        ref = next((r for r in rows if r["task"] == task and r["optimizer"] == "adamw" and r.get("state_bytes")), None)
        for r in rows:
            if r["task"] == task and ref and r.get("state_bytes") is not None:
                r["state_vs_adamw"] = r["state_bytes"] / ref["state_bytes"]
    return rows


def _fmt(v, nd=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{nd}g}"
    return str(v)


COLUMNS = [  # (header, key, formatter)
    ("optimizer", "optimizer", str),
    ("lr (tried)", "lr_show", str),
    ("train loss", "train_loss", lambda v: _fmt(v)),
    ("val", "val_main", lambda v: _fmt(v)),
    ("test loss", "test_loss", lambda v: _fmt(v)),
    ("test ppl / acc", "test_main", lambda v: _fmt(v)),
    ("state MiB", "state_bytes", lambda v: "-" if v is None else f"{v / MiB:.3g}"),
    ("% AdamW", "state_vs_adamw", lambda v: "-" if v is None else f"{100 * v:.1f}"),
    ("grad acc MiB", "grad_acc_bytes", lambda v: "-" if v is None else f"{v / MiB:.3g}"),
    ("trainable", "trainable_params", lambda v: "-" if v is None else f"{v / 1e6:.2f}M"),
    ("peak RSS MiB (+run)", "rss", str),
    ("step s", "median_step_s", lambda v: _fmt(v, 3)),
    ("tok/s", "tokens_per_s", lambda v: "-" if v is None else f"{v:.0f}"),
]


def _cells(r: dict, metric: str) -> list[str]:
    r = dict(r)
    r["val_main"] = r.get(f"val_{metric}")
    tried = [x for x in r.get("lrs_tried") or [] if x == x]  # NaN: not run
    r["lr_show"] = f"{r['lr']:g}" + (f" ({', '.join(f'{x:g}' for x in tried)})" if len(tried) > 1 else "")
    r["test_main"] = r.get("test_accuracy") if metric == "accuracy" else r.get("test_ppl")
    if (r.get("tau") or 1) > 1:  # what holds the gradient sum between micro-batches
        r["grad_acc_bytes"] = r.get("accum_bytes") if r.get("accum_bytes") is not None else r.get("dense_grad_bytes")
    if r.get("cuda_peak_mb") is not None:
        r["rss"] = f"{r['cuda_peak_mb']:.0f} (CUDA)"
    elif r.get("peak_rss_mb") is not None:
        d = r.get("peak_rss_delta_mb")
        r["rss"] = f"{r['peak_rss_mb']:.0f}" + (f" (+{d:.0f})" if d is not None else "")
    else:
        r["rss"] = "-"
    if not _ok(r):
        return [r["optimizer"], r["status"]] + [""] * (len(COLUMNS) - 2)
    return [f(r.get(k)) if r.get(k) is not None else "-" for _, k, f in COLUMNS]


def goal_lines(rows: list[dict]) -> list[str]:
    """Issue 4's goal: Flora r32 (beta1 0.9) within 1% of Adafactor beta1 0.9, below LoRA r32,
    state at most 10% of AdamW's."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        by = {r["optimizer"]: r for r in rows if r["task"] == task and _ok(r)}
        acc = any(r.get("test_accuracy") is not None for r in by.values())
        key = "test_accuracy" if acc else "test_loss"
        for fl in ("flora-r32", "flora-r32-paper"):
            f = by.get(fl)
            if f is None or f.get(key) is None:
                continue
            parts = []
            a = by.get("adafactor-b0.9")
            if a and a.get(key):
                if acc:  # accuracy: within 1 point, higher is better
                    d = a[key] - f[key]
                    parts.append(f"test accuracy {100 * f[key]:.1f}% vs adafactor-b0.9 {100 * a[key]:.1f}% "
                                 f"({'within' if d <= 0.01 else 'NOT within'} 1 point)")
                else:
                    d = f[key] / a[key] - 1
                    parts.append(f"test loss {100 * d:+.2f}% vs adafactor-b0.9 "
                                 f"({'within' if d <= 0.01 else 'NOT within'} 1%)")
            lo = by.get("lora-r32")
            if lo and lo.get(key):
                better = f[key] > lo[key] if acc else f[key] < lo[key]
                parts.append(f"{'better than' if better else 'NOT better than'} lora-r32 "
                             f"({f[key]:.4g} vs {lo[key]:.4g} {key.replace('_', ' ')})")
            if f.get("state_vs_adamw") is not None:
                s = f["state_vs_adamw"]
                parts.append(f"state {100 * s:.1f}% of AdamW ({'<=' if s <= 0.10 else '>'} 10%)")
            if parts:
                out.append(f"{task}, {fl}: " + "; ".join(parts))
    return out


def markdown(rows: list[dict], metrics: dict[str, str], meta: dict) -> str:
    lines = [f"# Flora benchmark ({meta['size']})", "",
             f"Command: `{meta['command']}`", "",
             f"Device: {meta['device_name']}; torch {meta['torch']}; {meta['started']}; "
             f"wall {meta.get('wall_s', 0) / 60:.1f} min.", "",
             "val = the validation loss (lower is better) or accuracy that picked the lr; test ppl / acc = "
             "perplexity (pretrain: per byte) or accuracy on the test split. State = optimizer-state bytes "
             "counted from the tensors (LoRA: its adapters' state). Peak RSS is the run process's high-water "
             "mark, with the part above its starting RSS in brackets. grad acc = memory holding the gradient sum "
             "between micro-batches (tau > 1): the dense .grad of the trainable parameters, or "
             "flora.CompressedAccumulator's buffers (+ca runs).", ""]
    for task in [t for t in ("pretrain", "finetune", "classify") if any(r["task"] == t for r in rows)]:
        tr = [r for r in rows if r["task"] == task]
        info = meta.get("tasks", {}).get(task, {})
        lines += [f"## {task}", ""]
        if info:
            lines += [info.get("description", ""), ""]
        lines.append("| " + " | ".join(h for h, _, _ in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for r in tr:
            lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(r, metrics[task])) + " |")
        lines.append("")
    goals = goal_lines(rows)
    if goals:
        lines += ["## Goal check (issue 4)", ""] + [f"- {g}" for g in goals] + [""]
    lines += ["![loss curves](loss_curves.png)", "", "![eval against state memory](eval_vs_state.png)", ""]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys and k not in ("curves", "traceback"):
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})


def _smooth(ys, k):
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def make_plots(out: Path, runs: list[dict], rows: list[dict], metrics: dict[str, str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("pretrain", "finetune", "classify") if any(r["task"] == t for r in rows)]
    chosen = {(r["task"], r["optimizer"], r["lr"]) for r in rows if _ok(r)}
    n = max(1, len(tasks))
    files = []

    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), squeeze=False, dpi=80)
    for ax, task in zip(axes[0], tasks):
        for r in runs:
            if r["task"] != task or (task, r["optimizer"], r["lr"]) not in chosen or "curves" not in r:
                continue
            tr = r["curves"]["train"]
            if not tr:
                continue
            xs, ys = zip(*tr)
            line, = ax.plot(xs, _smooth(ys, max(1, len(ys) // 20)), lw=1.2, label=r["optimizer"])
            if r["curves"]["val"]:
                vx, vy = zip(*r["curves"]["val"])
                ax.plot(vx, vy, "o", ms=3, color=line.get_color())
        lows = [v for line in ax.get_lines() for v in line.get_ydata()]
        if lows:  # show the part where optimizers differ, not the first steps' drop
            ends = [line.get_ydata()[len(line.get_ydata()) // 10] for line in ax.get_lines()
                    if len(line.get_ydata()) > 10 and line.get_linestyle() != "None"]
            top = max(ends) if ends else max(lows)
            ax.set_ylim(min(lows) - 0.02 * (top - min(lows)) - 1e-3, top)
        ax.set_title(f"{task}: train loss (line), val loss (dots)", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    files.append(out / "loss_curves.png")
    fig.savefig(files[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), squeeze=False, dpi=80)
    for ax, task in zip(axes[0], tasks):
        key = "test_accuracy" if metrics[task] == "accuracy" else "test_loss"
        pts = [(r["state_bytes"] / MiB, r[key], r["optimizer"]) for r in rows
               if r["task"] == task and _ok(r) and r.get(key) is not None and r.get("state_bytes")]
        for i, (x, y, name) in enumerate(sorted(pts)):
            ax.scatter([x], [y], s=18)
            ax.annotate(name, (x, y), fontsize=6, xytext=(4, 6 - 8 * (i % 3)), textcoords="offset points")
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{task}: {key.replace('_', ' ')} against optimizer state", fontsize=9)
        ax.set_xlabel("optimizer state (MiB, log scale)")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(out / "eval_vs_state.png")
    fig.savefig(files[-1])
    plt.close(fig)
    return files


def print_table(rows: list[dict], metrics: dict[str, str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        for r in rows:
            print(r["task"], " | ".join(_cells(r, metrics[r["task"]])))
        return
    import sys

    console = Console(width=None if sys.stdout.isatty() else 200)
    for task in [t for t in ("pretrain", "finetune", "classify") if any(r["task"] == t for r in rows)]:
        t = Table(title=f"{task} (val/test: {metrics[task]})", show_lines=False)
        for h, _, _ in COLUMNS:
            t.add_column(h, overflow="fold")
        for r in rows:
            if r["task"] == task:
                t.add_row(*_cells(r, metrics[task]))
        console.print(t)
    for g in goal_lines(rows):
        console.print(g)


def write_all(out: Path, runs: list[dict], rows: list[dict], metrics: dict[str, str], meta: dict, *,
              plots: bool = True) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "summary.csv", "runs_csv": out / "runs.csv",
             "md": out / "results.md"}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "summary": rows, "runs": runs}, f, indent=1, default=str)
    write_csv(paths["csv"], rows)
    write_csv(paths["runs_csv"], runs)
    paths["md"].write_text(markdown(rows, metrics, meta))
    if plots:
        for p in make_plots(out, runs, rows, metrics):
            paths[p.stem] = p
    return paths
