"""Scoring, apart from running: each (task, optimizer, kappa) at the lr whose mean
validation loss over seeds is lowest; its test loss, mean and std over seeds; the
worst case over tasks of test loss / the floor's (what ranks the candidates); the win
matrix; plots of loss against state bytes."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..names import DEFAULT_FLORA_FORM
from .space import FLOOR, KAPPA, TARGET


def _mean_std(xs):
    """Mean and sample std of the finite values; the std is None for one value (a spread of one
    seed is unknown, not 0)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _failed(r: dict) -> bool:
    return str(r.get("status", "")).startswith("error")


def _val(r: dict) -> float:
    """A run's validation loss; a diverged run's counts as infinite."""
    v = r.get("val_loss")
    return math.inf if v is None or not math.isfinite(v) else v


def choose(rows: list[dict], kappa: int = KAPPA) -> list[dict]:
    """One entry per (task, optimizer, kappa): the chosen lr and its figures; ``kappa``: the
    primary one (``--kappas``' first), where the baselines' and peers' runs are filed.

    The lr is the one with the lowest mean validation loss (a diverged seed counts as
    infinite; a tie goes to the lower lr) among the lrs that finished on the most seeds: a
    mean over one seed is not compared with a mean over three. An lr left out so that
    beat the chosen one on the seeds both ran, a crashed run not run again, and a seed
    without a test loss are said in the entry's ``notes``. Where a seed diverged at the
    chosen lr (every lr diverged on some seed), ``diverged`` counts those seeds and the
    test loss is None: the candidate ranks behind every one that finished, instead of by
    the mean of the seeds that survived."""
    primary = kappa
    by = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r.get("status") in ("ok", "diverged") or _failed(r):
            # kappa means nothing to the baselines and peers: their runs count at the primary
            # kappa whatever the sweep that ran them said (one run per seed)
            kappa = r["kappa"] if r["optimizer"].startswith("flora-") else primary
            seeds = by[(r["task"], r["optimizer"], kappa)][r["lr"]]
            if r["seed"] not in seeds or _failed(seeds[r["seed"]]):  # a rerun (--resume) replaces a crash
                seeds[r["seed"]] = r
    out = []
    for (task, opt, kappa), by_lr in by.items():
        lrs = {lr: [r for r in seeds.values() if not _failed(r)] for lr, seeds in by_lr.items()}
        lrs = {lr: rs for lr, rs in lrs.items() if rs}
        if not lrs:
            continue  # every run crashed: failed() lists it
        notes = [f"lr {lr:g} seed {s}: {r['status']} (run again with --resume)"
                 for lr, seeds in sorted(by_lr.items()) for s, r in sorted(seeds.items()) if _failed(r)]

        def val(lr):
            return statistics.fmean(_val(r) for r in lrs[lr])

        grid = sorted(lrs)
        most = max(len(rs) for rs in lrs.values())
        best = min((lr for lr in grid if len(lrs[lr]) == most), key=lambda lr: (val(lr), lr))
        if math.isinf(val(best)):  # an lr on fewer seeds that did not diverge is no result yet
            notes += [f"lr {lr:g} did not diverge on its {len(lrs[lr])} seed(s) of {most}: run it on every seed"
                      for lr in grid if len(lrs[lr]) < most and math.isfinite(val(lr))]
        rs = sorted(lrs[best], key=lambda r: r["seed"])
        mine = {r["seed"]: _val(r) for r in rs}
        for lr in grid:
            common = [s for s in mine if any(r["seed"] == s for r in lrs[lr])]
            if lr == best or len(lrs[lr]) == len(rs) or not common:
                continue
            theirs = {r["seed"]: _val(r) for r in lrs[lr]}
            if statistics.fmean(theirs[s] for s in common) < statistics.fmean(mine[s] for s in common):
                notes.append(f"lr {lr:g} ran on {len(lrs[lr])} seed(s) and beat the chosen lr {best:g} on the "
                             f"{len(common)} they share: run it on every seed to compare")
        diverged = sum(1 for r in rs if math.isinf(_val(r)))
        if diverged and opt in (FLOOR, TARGET) and diverged < len(rs):
            # a yardstick, not a candidate: scored on the seeds that finished, and said (as
            # "diverged" every ratio to it would be missing, the whole ranking with them)
            notes.append(f"diverged on {diverged} of {len(rs)} seeds at every lr run on {len(rs)}; its figures "
                         "are the mean of the others")
            rs = [r for r in rs if not math.isinf(_val(r))]
            diverged = 0
        tests = [r.get("test_loss") for r in rs]
        if not diverged and any(t is None for t in tests):
            notes.append(f"{sum(t is None for t in tests)} of {len(rs)} seeds at lr {best:g} have no test loss; "
                         "the mean is over the others")
        tm, ts = (None, None) if diverged else _mean_std(tests)
        am, as_ = (None, None) if diverged else _mean_std([r.get("test_accuracy") for r in rs])
        out.append({"task": task, "optimizer": opt, "kappa": kappa, "lr": best, "seeds": len(rs),
                    "diverged": diverged,
                    "edge": ("only" if len(grid) == 1 else "low" if best == grid[0] else
                             "high" if best == grid[-1] else ""),
                    "grid": grid, "test_loss": tm, "test_loss_std": ts, "test_accuracy": am,
                    "test_accuracy_std": as_, "state_bytes": rs[0].get("state_bytes"),
                    "per_seed": {r["seed"]: (None if diverged else r.get("test_loss")) for r in rs},
                    "train_s": statistics.fmean([r.get("train_s", 0.0) for r in rs]), "notes": notes})
    return sorted(out, key=lambda c: (c["task"], c["kappa"], c["optimizer"]))


def failed(rows: list[dict], kappa: int = KAPPA) -> list[dict]:
    """The (task, optimizer, kappa) whose runs all failed (no ok or diverged run): :func:`choose`
    has no row for them, so they are listed apart, with their statuses, instead of vanishing."""
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        if "task" not in r or "optimizer" not in r:
            continue
        k = (r["task"], r["optimizer"], r.get("kappa", kappa) if r["optimizer"].startswith("flora-") else kappa)
        by.setdefault(k, []).append(r)
    out = []
    for (task, opt, k), rs in by.items():
        if not any(r.get("status") in ("ok", "diverged") for r in rs):
            statuses = sorted({str(r.get("status", "?")) for r in rs})
            out.append({"task": task, "optimizer": opt, "kappa": k, "runs": len(rs), "status": "; ".join(statuses)})
    return sorted(out, key=lambda c: (c["task"], c["kappa"], c["optimizer"]))


def _find(chosen, task, opt, kappa=None):
    for c in chosen:
        if c["task"] == task and c["optimizer"] == opt and (kappa is None or c["kappa"] == kappa):
            return c
    return None


def paired(a: dict, b: dict) -> tuple[float | None, float | None, int]:
    """a - b (test loss) over the seeds both ran: mean, std (None for one seed), seeds."""
    d = [a["per_seed"][s] - b["per_seed"][s] for s in a["per_seed"] if s in b["per_seed"]
         and a["per_seed"][s] is not None and b["per_seed"][s] is not None]
    m, sd = _mean_std(d)
    return m, sd, len(d)


def ratio_std(a: dict, b: dict) -> float | None:
    """The sample std over the seeds both ran of a's test loss / b's, seed by seed: the
    spread of a ratio of means such as the worst case (None for fewer than two seeds)."""
    r = [a["per_seed"][s] / b["per_seed"][s] for s in a["per_seed"] if s in b["per_seed"]
         and a["per_seed"][s] is not None and b["per_seed"][s]]
    return _mean_std(r)[1]


def goal_check(chosen: list[dict], tasks: list[str], kappa: int = KAPPA) -> list[dict]:
    """The issue's two quality goals per Flora candidate and task, on paired seeds: r8
    beats the floor by more than one std (``beats_floor``), r32 matches or beats the
    target (``matches_target``: not worse by more than one std)."""
    out = []
    for opt in sorted({c["optimizer"] for c in chosen if c["optimizer"].startswith("flora-") and c["kappa"] == kappa}):
        for task in tasks:
            c, f, t = _find(chosen, task, opt, kappa), _find(chosen, task, FLOOR), _find(chosen, task, TARGET)
            if not c or not f or not t:
                continue
            if c.get("diverged"):  # it beats and matches nothing; the surviving seeds are no measure
                out.append({"optimizer": opt, "task": task, "seeds": c["seeds"], "vs_floor": None,
                            "vs_floor_std": None, "vs_target": None, "vs_target_std": None,
                            "beats_floor": False, "matches_target": False, "diverged": c["diverged"]})
                continue
            vf, sf, n = paired(c, f)
            vt, st, _ = paired(c, t)
            if vf is None or vt is None:
                continue
            out.append({"optimizer": opt, "task": task, "seeds": n, "vs_floor": vf, "vs_floor_std": sf,
                        "vs_target": vt, "vs_target_std": st,
                        "beats_floor": sf is not None and vf < -sf,
                        "matches_target": st is not None and vt <= st})
    return out


def gaps(chosen: list[dict]) -> dict[str, dict]:
    """Per task: floor - target (test loss) and its std over paired seeds; ``resolved``
    when that std is under a quarter of the gap (the issue's test of a long-enough run)."""
    out = {}
    for task in sorted({c["task"] for c in chosen}):
        f, t = _find(chosen, task, FLOOR), _find(chosen, task, TARGET)
        if not f or not t or f["test_loss"] is None or t["test_loss"] is None:
            continue
        gap, std, n = paired(f, t)
        out[task] = {"floor": f["test_loss"], "target": t["test_loss"], "gap": gap, "gap_std": std,
                     "seeds": n, "resolved": bool(gap and std is not None and std < abs(gap) / 4)}
    return out


def position(x: float, floor: float, target: float) -> float | None:
    """Where a test loss sits between the floor (0) and the target (1); above 1 beats the
    target. None where momentum does not help (the target is no better than the floor):
    there is no scale to place anything on."""
    if x is None or floor is None or target is None or target >= floor:
        return None
    return (floor - x) / (floor - target)


def ranking(chosen: list[dict], kappa: int, tasks: list[str]) -> list[dict]:
    """Candidates by their worst case: max over tasks of test loss / floor's test loss."""
    out = []
    for opt in sorted({c["optimizer"] for c in chosen if c["kappa"] == kappa}):
        ratios, pos, missing, diverged = {}, {}, [], []
        for task in tasks:
            c, f, t = _find(chosen, task, opt, kappa), _find(chosen, task, FLOOR), _find(chosen, task, TARGET)
            if c and c.get("diverged"):
                diverged.append(task)
                continue
            if not c or not f or c["test_loss"] is None or f["test_loss"] is None:
                missing.append(task)
                continue
            ratios[task] = c["test_loss"] / f["test_loss"]
            pos[task] = position(c["test_loss"], f["test_loss"], t["test_loss"] if t else None)
        if ratios or diverged:
            worst_task = max(ratios, key=ratios.get) if ratios else None
            out.append({"optimizer": opt, "kappa": kappa, "worst": max(ratios.values()) if ratios else None,
                        "worst_task": worst_task,
                        "worst_std": None if worst_task is None else ratio_std(
                            _find(chosen, worst_task, opt, kappa), _find(chosen, worst_task, FLOOR)),
                        "mean": statistics.fmean(ratios.values()) if ratios else None,
                        "ratios": ratios, "positions": pos, "missing": missing, "diverged": diverged})
    # a candidate that diverged on a task at its best lr is worse there than any that finished
    return sorted(out, key=lambda r: (len(r["diverged"]), len(r["missing"]),
                                      math.inf if r["worst"] is None else r["worst"]))


DEFAULT_ROWS = tuple(f"flora-r{r}-{DEFAULT_FLORA_FORM[0]}-{DEFAULT_FLORA_FORM[1]}" for r in (8, 32))  # the default form at r8, r32


def dominance(chosen: list[dict], tasks: list[str], kappa: int = KAPPA, flora=DEFAULT_ROWS) -> list[dict]:
    """The issue's plane check: per task, every peer with both less state and a lower mean
    test loss than a Flora row (at ``kappa``), with the paired difference peer - Flora."""
    from .peers import PEERS

    out = []
    for task in tasks:
        for f in flora:
            c = _find(chosen, task, f, kappa)
            if not c or c["test_loss"] is None or not c["state_bytes"]:
                continue
            for peer in PEERS:
                p = _find(chosen, task, peer)
                if not p or p["test_loss"] is None or not p["state_bytes"]:
                    continue
                if p["state_bytes"] < c["state_bytes"] and p["test_loss"] < c["test_loss"]:
                    d, sd, n = paired(p, c)
                    out.append({"task": task, "flora": f, "peer": peer, "peer_state": p["state_bytes"],
                                "flora_state": c["state_bytes"], "peer_loss": p["test_loss"],
                                "flora_loss": c["test_loss"], "diff": d, "diff_std": sd, "seeds": n})
    return out


def _fmt(m, s, digits=4):
    if m is None:
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


def _baselines_missing(chosen, gap, tasks) -> list[str]:
    """Lines naming the tasks without a floor or a target result and what leaves them out:
    the tables below had come out as headers alone (a probe), and a note that said both
    were missing where one was had misled (a review)."""
    out = []
    for task in tasks:
        if gap.get(task):
            continue
        has = {name: (c := _find(chosen, task, name)) is not None and c["test_loss"] is not None
               for name in (FLOOR, TARGET)}
        if not has[FLOOR] and not has[TARGET]:
            out.append(f"- {task}: neither the floor nor the target has a result: no gap, ranking or goal check")
        elif not has[TARGET]:
            out.append(f"- {task}: the target (`{TARGET}`) has no result: no gap, goal check or win-matrix "
                       "position (the ranking, against the floor, keeps it)")
        else:
            out.append(f"- {task}: the floor (`{FLOOR}`) has no result: no gap, ranking, goal check or win-matrix "
                       "position")
    return ["", "Missing baselines (run them with `--baselines`):", ""] + out if out else []


def markdown(chosen, gap, ranks, adamw, tasks, meta_line: str = "", kappa: int = KAPPA,
             failures: list[dict] = (), command: str = "") -> str:
    """The report; ``kappa``: the primary one (goal check, dominance, unlabelled win-matrix rows);
    ``failures``: :func:`failed`'s entries, listed where their rows would be missing."""
    primary = kappa
    lines = ["# flora-bench suite", ""]
    if meta_line:
        lines += [meta_line, ""]
    if command:  # as every subcommand's report: a 0.05-scale screen is told apart from a full run
        lines += [f"Command: `{command}`", ""]
    if failures:
        lines += ["## Failed: every run of these failed (they have no row below)", "",
                  "| task | optimizer | kappa | runs | status |", "| --- | --- | ---: | ---: | --- |"]
        lines += [f"| {f['task']} | {f['optimizer']} | {f['kappa']} | {f['runs']} | "
                  f"{f['status'].replace('|', '/')} |" for f in failures] + [""]
    lines += ["## Floor and target per task (test loss, mean ± std over seeds, at the best validation lr)", "",
              "| task | floor (Adafactor beta1=None) | target (beta1=0.9) | gap | gap std | std < gap/4 |",
              "| --- | ---: | ---: | ---: | ---: | :---: |"]
    for task in tasks:
        g = gap.get(task)
        if g:
            std = "-" if g["gap_std"] is None else f"{g['gap_std']:.4f}"
            verdict = "yes" if g["resolved"] else "no" if g["seeds"] > 1 else "1 seed"
            if g["gap"] is None:
                verdict, gap_s = "no seed in common", "-"
            else:
                gap_s = f"{g['gap']:.4f}"
            lines.append(f"| {task} | {g['floor']:.4f} | {g['target']:.4f} | {gap_s} | {std} | {verdict} |")
    lines += _baselines_missing(chosen, gap, tasks)
    notes = [f"- {c['task']} {c['optimizer']}" + (f" kappa {c['kappa']}" if c["kappa"] != primary else "")
             + f": {n}" for c in chosen for n in c.get("notes") or ()]
    if notes:
        lines += ["", "## Warnings: what the figures below rest on", ""] + notes
    lines += ["", "## Candidates by their worst case (max over tasks of test loss / floor's)", "",
              "The worst ratio is of the means; ± the std over seeds of the same ratio seed by seed (paired).", "",
              "| optimizer | kappa | worst | on | mean | tasks missing |", "| --- | ---: | ---: | --- | ---: | --- |"]
    for r in ranks:
        div = r.get("diverged") or []
        worst = "-" if r["worst"] is None else _fmt(r["worst"], r.get("worst_std"))
        if div:  # diverged at its best lr: worse there than any ratio
            worst = f"diverged on {', '.join(div)}" + ("" if r["worst"] is None else f"; else {worst}")
        lines.append(f"| {r['optimizer']} | {r['kappa']} | {worst} | {r['worst_task'] or '-'} | "
                     f"{'-' if r['mean'] is None else format(r['mean'], '.4f')} | {', '.join(r['missing']) or '-'} |")
    lines += ["", "## Win matrix", "",
              "Each cell: test loss mean ± std at the chosen lr, then its position between the floor (0) and the "
              "target (1) (above 1 beats the target, below 0 loses to no momentum; n/a where the target is no better "
              "than the floor); `*` marks a chosen lr at an edge of its grid (or the only lr tried).", "",
              "| optimizer | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    for opt in sorted({c["optimizer"] for c in chosen}, key=lambda o: (o.startswith("flora"), o)):
        for kappa in sorted({c["kappa"] for c in chosen if c["optimizer"] == opt}):
            cells = []
            for task in tasks:
                c = _find(chosen, task, opt, kappa)
                g = gap.get(task, {})
                if not c:
                    cells.append("-")
                    continue
                if c.get("diverged"):
                    cells.append(f"diverged ({c['diverged']} of {c['seeds']} seeds) lr {c['lr']:g}"
                                 f"{'*' if c['edge'] else ''}")
                    continue
                p = position(c["test_loss"], g.get("floor"), g.get("target"))
                cells.append(f"{_fmt(c['test_loss'], c['test_loss_std'])} ({'n/a' if p is None else f'{p:+.2f}'})"
                             f" lr {c['lr']:g}{'*' if c['edge'] else ''}")
            name = opt if kappa == primary else f"{opt} kappa {kappa}"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"## Goal check (kappa {primary}; paired seeds; loss minus the floor's and the target's, mean ± std)",
              "", "`F` beats the floor by more than one std; `T` is not worse than the target by more than one std.",
              "", "| optimizer | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    checks = goal_check(chosen, tasks, primary)
    for opt in sorted({g["optimizer"] for g in checks}):
        cells = []
        for task in tasks:
            g = next((g for g in checks if g["optimizer"] == opt and g["task"] == task), None)
            cells.append("-" if not g else f"{_fmt(g['vs_floor'], g['vs_floor_std'])} / "
                         f"{_fmt(g['vs_target'], g['vs_target_std'])} {'F' if g['beats_floor'] else ''}"
                         f"{'T' if g['matches_target'] else ''}")
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    dom = dominance(chosen, tasks, primary)
    lines += ["", f"## Peers with both less state and a lower mean test loss than Flora's default form (r8, r32; "
              f"kappa {primary})",
              "", "Paired difference: the peer's test loss minus Flora's over the seeds both ran, mean ± std.", ""]
    if dom:
        lines += ["| task | Flora | peer | state (peer / Flora) | test loss (peer / Flora) | paired difference |",
                  "| --- | --- | --- | ---: | ---: | ---: |"]
        for d in dom:
            lines.append(f"| {d['task']} | {d['flora']} | {d['peer']} | {d['peer_state']} / {d['flora_state']} | "
                         f"{d['peer_loss']:.4f} / {d['flora_loss']:.4f} | {_fmt(d['diff'], d['diff_std'])} |")
    elif any(_find(chosen, t, f, primary) for t in tasks for f in DEFAULT_ROWS):
        lines.append("None.")
    else:  # "None." read as a verdict where nothing was compared (a probe)
        lines.append(f"Not checked: Flora's default form ran at neither r8 nor r32 here ({', '.join(DEFAULT_ROWS)}).")
    lines += ["", "## State bytes (from the optimizer's tensors) against AdamW's", "",
              "| optimizer | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    for opt in sorted({c["optimizer"] for c in chosen}):
        cells = []
        for task in tasks:
            c = _find(chosen, task, opt)
            a = adamw.get(task)
            cells.append("-" if not c or not c["state_bytes"] or not a else
                         f"{c['state_bytes'] / 2**20:.2f} MiB ({100 * c['state_bytes'] / a:.1f}%)")
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    lines.append("| adamw | " + " | ".join(f"{adamw[t] / 2**20:.2f} MiB" if t in adamw else "-" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, chosen: list[dict]) -> None:
    keys = ["task", "optimizer", "kappa", "lr", "edge", "seeds", "test_loss", "test_loss_std", "test_accuracy",
            "test_accuracy_std", "state_bytes", "train_s"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for c in chosen:
            w.writerow(c)


def plot(path: Path, chosen: list[dict], tasks: list[str], kappa: int) -> Path | None:
    """Per task, test loss against state bytes (log scale): the quality-memory plane."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = len(tasks)
    cols = min(4, n)
    rows_ = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.4 * rows_), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for c in chosen:
            if c["task"] != task or c["kappa"] != kappa or c["test_loss"] is None or not c["state_bytes"]:
                continue
            ax.errorbar(c["state_bytes"], c["test_loss"], yerr=c["test_loss_std"] or 0, fmt="o", ms=4, capsize=2)
            ax.annotate(c["optimizer"].replace("flora-", "").replace("-orthonormal", ""),
                        (c["state_bytes"], c["test_loss"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("optimizer state (bytes)", fontsize=7)
        ax.set_ylabel("test loss", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
