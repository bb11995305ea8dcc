"""The ``train`` subcommand's results: each optimizer's lr chosen on the validation split,
goal checks (goals are data: ``config.TRAIN_GOALS``), and the outputs: JSON, CSV, a
Markdown table, PNG plots and a table on the terminal; and merging results files."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from . import config, core
from .config import Goal
from .core import MiB
from .records import RunResult
from .rows import SEED_KEYS, TASK_ORDER, Chosen, mean_std, plus_minus, write_csv  # noqa: F401 - also report.<name>
from .rows import fmt as _fmt


def val_score(r: RunResult, metric: str) -> float:
    """Higher is better; failed or diverged runs score -inf."""
    if not r.ok:
        return -math.inf
    v = getattr(r, f"val_{metric}", None)
    if v is None or not math.isfinite(v):
        return -math.inf
    return v if metric == "accuracy" else -v


def lr_score(rs: list[RunResult], metric: str) -> float:
    """The validation score of one lr: the mean over its seeds; -inf when a seed failed,
    diverged or scored NaN (an lr that breaks on some seeds is not chosen)."""
    scores = [val_score(r, metric) for r in rs]
    return -math.inf if not scores or -math.inf in scores else statistics.fmean(scores)


def by_lr(rs: list[RunResult]) -> dict[float, list[RunResult]]:
    """Runs grouped by lr (every seed of it), in order of first appearance; NaN lrs (not run) together."""
    out: dict = {}
    for r in rs:
        out.setdefault("nan" if r.lr != r.lr else r.lr, []).append(r)
    return out


def seeds_done(runs: list[RunResult]) -> int:
    """The seeds ``runs`` (one lr's) finished on: a crash (``failed: ...``) is none, a
    divergence is one."""
    return len({r.seed for r in runs if not r.status.startswith("failed")})


def best_lr(lrs: dict, metric: str):
    """The key of ``lrs`` (:func:`by_lr`) with the best mean validation score, among the lrs
    that finished on the most seeds: a mean over one seed is not compared with a mean over
    three (an lr screened on seed 0 and not confirmed does not win by its one draw). A
    crashed run (``failed: ...``) is no seed finished, as in the suite; a diverged one is:
    where every lr of the most seeds diverged on one, the chosen lr is not ok (an lr on
    fewer seeds that did not diverge is no result yet). A tie goes to the lowest lr,
    whatever order the runs came in."""
    def key(k):
        return lr_score(lrs[k], metric), -(k if isinstance(k, float) else math.inf)

    most = max(seeds_done(v) for v in lrs.values())
    return max((k for k in lrs if seeds_done(lrs[k]) == most), key=key)


def choose(runs: list[RunResult], metrics: dict[str, str]) -> list[Chosen]:
    """One row per (task, optimizer), in order of first appearance: the lr with the best
    mean validation ``metrics[task]`` over its seeds ("loss": lowest, "accuracy": highest);
    state also as a fraction of AdamW's on the same task."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.task, r.optimizer), []).append(r)
    rows = []
    for (task, _), rs in groups.items():
        lrs = by_lr(rs)
        best = best_lr(lrs, metrics[task])
        chosen = sorted(lrs[best], key=lambda r: r.seed)  # the first seed's run stands for the row
        ok = lr_score(chosen, metrics[task]) > -math.inf
        status = "ok" if ok else chosen[0].status
        if not ok:
            statuses = sorted({r.status for r in rs})
            status = statuses[0] if len(statuses) == 1 else "; ".join(statuses)
        tried = [r[0].lr for r in lrs.values()]
        finite = sorted(x for x in tried if x == x)
        edge = None
        if ok and len(finite) > 1:
            edge = "lower" if chosen[0].lr == finite[0] else "upper" if chosen[0].lr == finite[-1] else None
        done = {r[0].lr: seeds_done(r) for r in lrs.values()}
        rows.append(Chosen(chosen[0], tried, status, runs=chosen, lr_edge=edge,
                           lr_scores={r[0].lr: lr_score(r, metrics[task]) for r in lrs.values()},
                           # (an lr that crashed on every seed is no result: its status says so)
                           short_lrs={k: (n, max(done.values())) for k, n in done.items()
                                      if 0 < n < max(done.values())}))
    for row in rows:
        ref = next((r for r in rows if r.task == row.task and r.optimizer == "adamw" and r.run.state_bytes), None)
        if ref and row.run.state_bytes is not None:
            row.state_vs_adamw = row.run.state_bytes / ref.run.state_bytes
            if row.run.cache_bytes is not None:  # None in a results file from before 2026-12-06
                row.held_vs_adamw = (row.run.state_bytes + row.run.cache_bytes) / ref.run.state_bytes
    return rows


def mark_capped(rows: list[Chosen], meta: dict) -> None:
    """``lr_capped`` on the rows that ``meta["lr_extension"]["capped"]`` names and whose lr is
    still an end of the tried grid."""
    capped = set((meta.get("lr_extension") or {}).get("capped") or [])
    for r in rows:
        r.lr_capped = f"{r.task}:{r.optimizer}" in capped and r.lr_edge is not None


COLUMNS = [  # (header, key, formatter)
    ("optimizer", "optimizer", str),
    ("lr (tried)", "lr_show", str),
    ("train loss", "train_loss", lambda v: _fmt(v)),
    ("val", "val_main", lambda v: _fmt(v)),
    ("test loss", "test_loss", lambda v: _fmt(v)),
    ("test ppl / acc", "test_main", lambda v: _fmt(v)),
    ("state MiB", "state_bytes", lambda v: "-" if v is None else f"{v / MiB:.3g}"),
    ("cache MiB", "cache_bytes", lambda v: "-" if v is None else f"{v / MiB:.3g}"),
    ("% AdamW", "state_vs_adamw", lambda v: "-" if v is None else f"{100 * v:.1f}"),
    ("+cache %", "held_vs_adamw", lambda v: "-" if v is None else f"{100 * v:.1f}"),
    ("grad acc MiB", "grad_acc_bytes", lambda v: "-" if v is None else f"{v / MiB:.3g}"),
    ("trainable", "trainable_params", lambda v: "-" if v is None else f"{v / 1e6:.2f}M"),
    ("peak RSS MiB (+run)", "rss", str),
    ("step s", "median_step_s", lambda v: _fmt(v, 3)),
    ("tok/s", "tokens_per_s", lambda v: "-" if v is None else f"{v:.0f}"),
]


SEED_COLUMN = ("seeds", "seeds", str)  # shown, with mean +- std of the scores, where a row has two or more


def columns(seeded: bool) -> list[tuple]:
    """The table's columns; ``seeded``: a seeds column after the lr."""
    return COLUMNS[:2] + [SEED_COLUMN] + COLUMNS[2:] if seeded else COLUMNS


def _cells(row: Chosen, metric: str, seeded: bool = False) -> list[str]:
    r = row.to_dict()
    main = {"val_main": f"val_{metric}", "test_main": "test_accuracy" if metric == "accuracy" else "test_ppl"}
    for k, src in main.items():
        r[k], r[f"{k}_std"] = r.get(src), r.get(f"{src}_std")
    tried = [x for x in r.get("lrs_tried") or [] if x == x]  # NaN: not run
    r["lr_show"] = (f"{r['lr']:g}" + ("*" if r.get("lr_edge") else "")
                    + (f" ({', '.join(f'{x:g}' for x in sorted(tried))})" if len(tried) > 1 else ""))
    if (r.get("tau") or 1) > 1:  # what holds the gradient sum between micro-batches
        r["grad_acc_bytes"] = r.get("accum_bytes") if r.get("accum_bytes") is not None else r.get("dense_grad_bytes")
    if r.get("cuda_peak_mb") is not None:
        r["rss"] = f"{r['cuda_peak_mb']:.0f} (CUDA)"
    elif r.get("peak_rss_mb") is not None:
        d = r.get("peak_rss_delta_mb")
        r["rss"] = f"{r['peak_rss_mb']:.0f}" + (f" (+{d:.0f})" if d is not None else "")
    else:
        r["rss"] = "-"
    if r.get("compresses_nothing"):  # as step and comm mark it: a Flora row that is Adafactor with momentum
        r["optimizer"] += " (compresses nothing)"
    cols = columns(seeded)
    if not row.ok:
        return [r["optimizer"], r["status"]] + [""] * (len(cols) - 2)
    if seeded:  # mean +- sample std over the seeds
        return [plus_minus(r[k], r.get(f"{k}_std")) if k in SEED_KEYS + tuple(main) and r.get(k) is not None
                else f(r.get(k)) if r.get(k) is not None else "-" for _, k, f in cols]
    return [f(r.get(k)) if r.get(k) is not None else "-" for _, k, f in cols]


def seeded(rows: list[Chosen]) -> bool:
    """Whether the table needs a seeds column: a row averages two or more seeds, or the
    rows ran on different seeds."""
    return any(len(r.runs) > 1 for r in rows) or len({tuple(r.seeds) for r in rows}) > 1


def goal_parts(goal: Goal, name: str, by: dict[str, dict], key: str | None = None,
               higher_is_better: bool = False) -> list[str]:
    """The checks of ``goal`` for optimizer ``name``, as text. ``by``: optimizer name ->
    its flat figures (``key`` the quality figure, e.g. ``test_loss``; ``state_vs_adamw``;
    ``held_vs_adamw`` or ``with_cache_vs_adamw``, state and cache; ``median_step_s``). A
    check whose figures are missing is left out. The state goal is judged on the state and
    the cache together where the cache is known: the default ``cache_projections=True``
    holds the projections beside the state (as much again at r32 on small widths)."""
    f = by.get(name) or {}
    parts = []
    val = f.get(key) if key else None
    a = by.get(goal.near) if goal.near else None
    if val is not None and a and a.get(key) is not None and (higher_is_better or a[key] > 0):
        tol = goal.tolerance
        if higher_is_better:  # accuracy: absolute, in points
            within = a[key] - val <= tol
            parts.append(f"{key.replace('_', ' ')} {100 * val:.1f}% vs {goal.near} {100 * a[key]:.1f}% "
                         f"(goal: at most {100 * tol:g} {'point' if tol == 0.01 else 'points'} below it: "
                         f"{'met' if within else 'NOT met'})")
        else:
            d = val / a[key] - 1
            parts.append(f"{key.replace('_', ' ')} {100 * d:+.2f}% vs {goal.near} "
                         f"(goal: at most {100 * tol:g}% above it: {'met' if d <= tol else 'NOT met'})")
    b = by.get(goal.beats) if goal.beats else None
    if val is not None and b and b.get(key) is not None:
        better = val > b[key] if higher_is_better else val < b[key]
        parts.append(f"{'better than' if better else 'NOT better than'} {goal.beats} "
                     f"({val:.4g} vs {b[key]:.4g} {key.replace('_', ' ')})")
    s = f.get("state_vs_adamw")
    held = next((f[k] for k in ("held_vs_adamw", "with_cache_vs_adamw") if f.get(k) is not None), None)
    if goal.max_state_vs_adamw is not None and s is not None:
        limit = goal.max_state_vs_adamw
        if held is not None and held != s:
            ok = held <= limit  # said as the quality checks say it (a probe read '>' as easily missed)
            parts.append(f"state {100 * s:.1f}% of AdamW, {100 * held:.1f}% with the projection cache (goal: at "
                         f"most {100 * limit:g}%, cache included: {'met' if ok else 'NOT met'})")
        else:
            parts.append(f"state {100 * s:.1f}% of AdamW (goal: at most {100 * limit:g}%: "
                         f"{'met' if s <= limit else 'NOT met'})")
    if goal.max_step_vs is not None:
        ref, limit = goal.max_step_vs
        t, t_ref = f.get("median_step_s"), (by.get(ref) or {}).get("median_step_s")
        if t and t_ref:
            ratio = t / t_ref
            parts.append(f"step {ratio:.2f}x {ref}'s (goal: at most {limit:g}x: "
                         f"{'met' if ratio <= limit else 'NOT met'})")
    return parts


def goal_lines(rows: list[Chosen], goals: tuple[Goal, ...] = config.TRAIN_GOALS) -> list[str]:
    """One line per task and goal optimizer that ran: each check of its goal, met or NOT;
    a Flora that compresses nothing (its rank at least every projected dimension) is not
    judged: the line says so (it had been "met" for Adafactor with momentum)."""
    out = []
    for task in sorted({r.task for r in rows}):
        by = {r.optimizer: r.to_dict() for r in rows if r.task == task and r.ok}
        acc = any(r.get("test_accuracy") is not None for r in by.values())
        key = "test_accuracy" if acc else "test_loss"
        for goal in goals:
            for name in goal.optimizers:
                if (by.get(name) or {}).get(key) is None:
                    continue
                if by[name].get("compresses_nothing"):
                    line = f"{task}, {name}: {core.NOTHING_COMPRESSED}; goal not judged (a rank below the model's width is)"
                    out += [line] if line not in out else []
                    continue
                parts = goal_parts(goal, name, by, key, higher_is_better=acc)
                if parts:
                    src = f" ({goal.source})" if goal.source else ""
                    # A comparison with an lr on the end of its grid is not settled: say so.
                    edges = [f"{n} at the {by[n]['lr_edge']} end" for n in (name, goal.near, goal.beats)
                             if n in by and by[n].get("lr_edge")]
                    unsettled = f" [lr {', '.join(edges)} of its grid: unsettled]" if edges else ""
                    out.append(f"{task}, {name}: " + "; ".join(parts) + src + unsettled)
    return out


def _wall(meta: dict) -> str:
    """The wall time; a resumed run's also counts what it resumed (a resume with nothing left
    to run had said "Wall 0.0 min" alone)."""
    wall = meta.get("wall_s", 0)
    before = (meta.get("resumed_from") or {}).get("wall_s_all")
    if not before:
        return f" Wall {wall / 60:.1f} min."
    return f" Wall {wall / 60:.1f} min this time, {(wall + before) / 60:.1f} min with the runs it resumed."


def markdown(rows: list[Chosen], metrics: dict[str, str], meta: dict,
             images: tuple[str, ...] = ("loss_curves.png", "eval_vs_state.png")) -> str:
    lines = [f"# Flora benchmark ({meta.get('size', '?')})", "",
             f"Command: `{meta.get('command', '?')}`", "",
             core.meta_line(meta) + _wall(meta), "",
             "val = the validation loss (lower is better) or accuracy that picked the lr; test ppl / acc = "
             "perplexity (pretrain: per byte) or accuracy on the test split. State = optimizer-state bytes "
             "counted from the tensors (LoRA: its adapters' state); cache = the projections Flora keeps beside its "
             "state (cache_projections=True, the default; never saved); +cache % = state and cache over AdamW's "
             "state, what the state goal is judged on. Peak RSS "
             "is the run process's high-water mark, with the part above its starting RSS in brackets. grad acc = memory holding the gradient sum "
             "between micro-batches (tau > 1): the dense .grad of the trainable parameters, or "
             "flora.CompressedAccumulator's buffers (+ca runs).", ""]
    if meta.get("partial"):
        lines += [f"**Partial:** written while the run was in progress ({meta.get('runs_done', '?')} runs done); "
                  "a run that finished rewrites this file without this line, so the run was stopped here. "
                  "Continue it with `--resume` on its results.json.", ""]
    if meta.get("merge_differences"):
        lines += ["**Warning:** merged results whose settings differ; the task descriptions below give the first "
                  "file's: " + "; ".join(meta["merge_differences"]) + ".", ""]
    seeds = meta.get("seeds") or []
    # an lr on fewer seeds than its row's others (a resumed or stopped run) is not compared: said
    short = [f"{r.task} {r.optimizer} lr {lr:g} ({n} of {most})" for r in rows
             for lr, (n, most) in r.short_lrs.items()]
    row_seeds = {tuple(r.seeds) for r in rows}
    if len(seeds) > 1 and row_seeds == {tuple(seeds)}:
        every = "Every (optimizer, lr) ran" if not short else "Every (optimizer, lr) but those not compared (below) ran"
        lines += [f"{every} on {len(seeds)} seeds ({', '.join(map(str, seeds))}: model init, data "
                  f"order and projections); the lr is the best on the mean validation score, and the scores are "
                  f"the mean over {len(seeds)} seeds ± their sample standard deviation. Memory, timings and curves "
                  "are those of the first seed.", ""]
    elif len(seeds) > 1:  # rows of merged or resumed results on other seeds: said by row (probe Z134)
        counts = sorted({len(s) for s in row_seeds})
        lines += [f"The rows ran on {counts[0] if len(counts) == 1 else f'{counts[0]} to {counts[-1]}'} of the "
                  f"seeds {', '.join(map(str, seeds))} (model init, data order and projections), not all on the same "
                  "ones: each row's number is in its seeds column, which ones in results.json. The lr is the "
                  "best on the mean validation score over the row's seeds, and the scores are that mean ± the "
                  "sample standard deviation (a row of one "
                  "seed has none). Memory, timings and curves are those of each row's first seed.", ""]
    if short:
        lines += ["**Not compared:** lrs that finished on fewer seeds than the others of their row (a mean over "
                  "fewer seeds is not set against one over more; run them on the missing seeds, e.g. with "
                  "`--resume`): " + ", ".join(short) + ".", ""]
    for task in [t for t in TASK_ORDER if any(r.task == t for r in rows)]:
        info = meta.get("tasks", {}).get(task, {})
        lines += [f"## {task}", ""]
        if info:
            lines += [info.get("description", ""), ""]
        mine = [r for r in rows if r.task == task]
        sd = seeded(mine)
        lines += core.markdown_table([h for h, _, _ in columns(sd)], (_cells(r, metrics[task], sd) for r in mine))
        lines.append("")
    edges = [f"{r.task} {r.optimizer} ({r.lr_edge})" for r in rows if r.lr_edge and not r.lr_capped
             and not r.edge_tied]
    if edges:
        lines += ["\\* The best lr is an end of the lrs tried, so a better one may lie beyond it (`--extend-lr N` "
                  "runs further lrs until it is inside): " + ", ".join(edges) + ".", ""]
    flat = [f"{r.task} {r.optimizer} ({r.lr_edge})" for r in rows if r.lr_edge and not r.lr_capped and r.edge_tied]
    if flat:  # grid extension does not follow a tie: --extend-lr would not move it (probe Z134)
        lines += ["\\* The best lr is an end of the lrs tried and scores the same as the lr next to it (a flat "
                  "validation score), so `--extend-lr` runs no lr beyond it: " + ", ".join(flat) + ".", ""]
    capped = [f"{r.task} {r.optimizer} ({r.lr_edge})" for r in rows if r.lr_capped]
    if capped:
        cap = {r.task: info.get("config", {}).get("extend_lr") for r, info in
               ((r, meta.get("tasks", {}).get(r.task, {})) for r in rows if r.lr_capped)}
        lines += [f"\\* The best lr is still an end of the tried grid after the cap of grid extensions "
                  f"({', '.join(f'{t}: {c}' for t, c in cap.items())}): " + ", ".join(capped) + ".", ""]
    goals = goal_lines(rows)
    if goals:
        lines += ["## Goal check", ""] + [f"- {g}" for g in goals] + [""]
    alt = {"loss_curves.png": "loss curves", "eval_vs_state.png": "eval against state memory"}
    for name in images:  # the figures written with these results (none in a partial write)
        lines += [f"![{alt.get(name, name)}]({name})", ""]
    return "\n".join(lines)


def _smooth(ys, k):
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def make_plots(out: Path, runs: list[RunResult], rows: list[Chosen], metrics: dict[str, str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASK_ORDER if any(r.task == t for r in rows)]
    chosen = {(r.task, r.optimizer, r.run.lr, r.run.seed) for r in rows if r.ok}  # one seed's curves
    n = max(1, len(tasks))
    files = []

    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), squeeze=False, dpi=80)
    for ax, task in zip(axes[0], tasks):
        for r in runs:
            if r.task != task or (task, r.optimizer, r.lr, r.seed) not in chosen or not r.curves:
                continue
            tr = r.curves["train"]
            if not tr:
                continue
            xs, ys = zip(*tr)
            line, = ax.plot(xs, _smooth(ys, max(1, len(ys) // 20)), lw=1.2, label=r.optimizer)
            if r.curves["val"]:
                vx, vy = zip(*r.curves["val"])
                ax.plot(vx, vy, "o", ms=3, color=line.get_color())
        lows = [v for line in ax.get_lines() for v in line.get_ydata()]
        if lows:  # show the part where optimizers differ, not the first steps' drop
            ends = [line.get_ydata()[len(line.get_ydata()) // 10] for line in ax.get_lines()
                    if len(line.get_ydata()) > 10 and line.get_linestyle() != "None"]
            top = max(ends) if ends else max(lows)
            ax.set_ylim(min(lows) - 0.02 * (top - min(lows)) - 1e-3, top)
        seeds = {r.seed for r in runs if r.task == task}
        first = f", the first of {len(seeds)} seeds" if len(seeds) > 1 else ""  # the row's run (a probe)
        ax.set_title(f"{task}: train loss (line), val loss (dots){first}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    files.append(out / "loss_curves.png")
    fig.savefig(files[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), squeeze=False, dpi=80)
    for ax, task in zip(axes[0], tasks):
        key = "test_accuracy" if metrics[task] == "accuracy" else "test_loss"
        pts = [((r.run.state_bytes + (r.run.cache_bytes or 0)) / MiB, r.get(key), r.optimizer) for r in rows
               if r.task == task and r.ok and r.get(key) is not None and r.run.state_bytes]
        for i, (x, y, name) in enumerate(sorted(pts)):
            ax.scatter([x], [y], s=18)
            ax.annotate(name, (x, y), fontsize=6, xytext=(4, 6 - 8 * (i % 3)), textcoords="offset points")
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{task}: {key.replace('_', ' ')} against optimizer state", fontsize=9)
        ax.set_xlabel("optimizer state + Flora's projection cache (MiB, log scale)")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(out / "eval_vs_state.png")
    fig.savefig(files[-1])
    plt.close(fig)
    return files


def print_table(rows: list[Chosen], metrics: dict[str, str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:  # pragma: no cover
        for r in rows:
            print(r.task, " | ".join(_cells(r, metrics[r.task], seeded(rows))))
        return
    import sys

    console = Console(width=None if sys.stdout.isatty() else 200)
    for task in [t for t in TASK_ORDER if any(r.task == t for r in rows)]:
        t = Table(title=f"{task} (val/test: {metrics[task]})", show_lines=False)
        mine = [r for r in rows if r.task == task]
        sd = seeded(mine)
        for h, _, _ in columns(sd):
            t.add_column(h, overflow="fold")
        for r in mine:  # cells are plain text: "[...]" in a status or name is not rich markup
            t.add_row(*(Text(c) for c in _cells(r, metrics[task], sd)))
        console.print(t)
    for g in goal_lines(rows):  # markup=False: rich would drop the "[lr ... unsettled]" caveat as a tag
        console.print(g, markup=False)


def write_all(out: Path, runs: list[RunResult], rows: list[Chosen], metrics: dict[str, str], meta: dict, *,
              plots: bool = True) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "summary.csv", "runs_csv": out / "runs.csv",
             "md": out / "results.md"}
    core.write_json(paths["json"], {"meta": meta, "summary": [r.to_dict() for r in rows],
                                    "runs": [r.to_dict() for r in runs]})
    write_csv(paths["csv"], [r.to_dict() for r in rows])
    write_csv(paths["runs_csv"], [r.to_dict() for r in runs])
    from . import forms

    more = forms.write(out, rows, metrics, meta, plots=plots)
    made = make_plots(out, runs, rows, metrics) if plots else []
    # a partial write (plots=False) had linked figures not yet drawn (probe Z105)
    md = markdown(rows, metrics, meta, images=tuple(p.name for p in made))
    if more:
        md += "\nThe momentum forms side by side, against rank: [forms.md](forms.md).\n"
    paths["md"].write_text(md)
    paths.update(more)
    for p in made:
        paths[p.stem] = p
    return paths


def merge(paths: list[Path]) -> tuple[dict, list[RunResult]]:
    """Several results.json files as one: the first's metadata, every run (one per task,
    optimizer, lr and seed: :func:`unique_runs`); commands joined with ``&&``, wall times
    added, each task's optimizer list and the seeds the union in order; partial only where
    a stopped part's tasks hold fewer runs than it planned."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    meta = dict(parts[0]["meta"])
    meta["tasks"] = {t: {**info, "config": dict(info["config"])} for t, info in meta.get("tasks", {}).items()}
    differ = list(meta.get("merge_differences") or [])  # settings that differ from the first file's (kept)
    for path, d in zip(paths[1:], parts[1:]):
        if d["meta"].get("size") != meta.get("size"):
            differ.append(f"size: {meta.get('size')!r} ({paths[0]}) vs {d['meta'].get('size')!r} ({path})")
        meta["command"] = meta.get("command", "?") + " && " + d["meta"].get("command", "?")
        meta["wall_s"] = meta.get("wall_s", 0) + d["meta"].get("wall_s", 0)
        for key in ("commit", "started"):
            if d["meta"].get(key) and d["meta"].get(key) != meta.get(key):
                meta[key] = f"{meta.get(key)}, {d['meta'][key]}"
        for t, info in d["meta"].get("tasks", {}).items():
            if t in meta["tasks"]:  # the first file's settings stay: say where another's differ
                differ += [f"{t} {k}: {meta['tasks'][t]['config'].get(k)!r} ({paths[0]}) vs {v!r} ({path})"
                           for k, v in info["config"].items()
                           if k != "optimizers" and meta["tasks"][t]["config"].get(k) != v]
            mine = meta["tasks"].setdefault(t, {**info, "config": dict(info["config"])})
            opts = list(mine["config"]["optimizers"])
            mine["config"]["optimizers"] = opts + [o for o in info["config"]["optimizers"] if o not in opts]
        meta["seeds"] = sorted(set(meta.get("seeds") or []) | set(d["meta"].get("seeds") or []))
        ext, more = meta.setdefault("lr_extension", {}), d["meta"].get("lr_extension") or {}
        for key in ("grids", "extended"):
            mine = ext.setdefault(key, {})
            for k, v in (more.get(key) or {}).items():
                mine[k] = sorted(set(mine.get(k, [])) | set(v))
        ext["capped"] = list(dict.fromkeys((ext.get("capped") or []) + (more.get("capped") or [])))
    if differ:
        meta["merge_differences"] = differ
        core.say("flora-bench: warning: the merged files' settings differ (the first's are reported): "
                 + "; ".join(differ))
    runs = unique_runs([RunResult.from_dict(r) for d in parts for r in d["runs"]])
    # Done and planned of the merge, not of the first file (probe Z105: a stopped run merged
    # with its finished rerun read "partial, 4 runs done" over 12 runs). A stopped part is
    # finished by another file that completed the same plan (every task of the stopped one,
    # configured alike); counting runs instead let other optimizers' or lr extensions' runs
    # stand in for missing ones (review Z106). Planned: the sum over the parts not so covered
    covered = [bool(d["meta"].get("partial")) and any(_completes(e["meta"], d["meta"]) for e in parts if e is not d)
               for d in parts]
    meta["runs_done"] = len(runs)
    meta["runs_planned"] = sum(d["meta"].get("runs_planned") or len(d["runs"]) for d, c in zip(parts, covered)
                               if not c)
    meta.pop("partial", None)
    if any(d["meta"].get("partial") and not c for d, c in zip(parts, covered)):
        meta["partial"] = True
    return meta, runs


def _completes(done: dict, stopped: dict) -> bool:
    """Whether the finished results' metadata ``done`` ran the plan of ``stopped``."""
    tasks, mine = stopped.get("tasks") or {}, done.get("tasks") or {}
    return (not done.get("partial") and bool(tasks) and done.get("size") == stopped.get("size")
            and all(t in mine and mine[t].get("config") == info.get("config") for t, info in tasks.items()))


def unique_runs(runs: list[RunResult]) -> list[RunResult]:
    """One run per (task, optimizer, lr, seed), in order of first appearance: where a run was
    repeated (a resumed sweep merged with the interrupted one), the last that finished ok,
    else the last. Runs of other seeds are all kept: they are what the mean is taken over."""
    keep: dict[tuple, RunResult] = {}
    for r in runs:
        key = (r.task, r.optimizer, "nan" if r.lr != r.lr else r.lr, r.seed)
        if key not in keep or r.ok or not keep[key].ok:
            keep[key] = r
    return list(keep.values())
