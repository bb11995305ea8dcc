"""``flora-bench suite``: the selection suite (issue 17). Every candidate momentum form at
every rank, with Adafactor without (the floor) and with (the target) first moment, on
the kinds of task ``--tasks`` lists, an lr grid and several seeds; Flora at the library's defaults
(the library's default ``kappa`` unless ``--kappas`` adds a sweep). Runs in parts (``--tasks``) and
continues an interrupted sweep (``--resume``: the runs already in ``runs.jsonl`` are kept, at
the same ``--scale`` only; one that crashed, or died with its worker, runs again).
``--extend-lr N`` runs further lrs, in rounds, while a best lr sits at an end of those tried.

    flora-bench suite --prepare-only                       # build the data folder
    flora-bench suite --device cuda --workers 12           # everything, 3 seeds
    flora-bench suite --tasks cnn,vit --seeds 1 --resume   # a part, screening
    flora-bench suite --seeds 3 --extend-lr 2 --resume     # confirm, grids extended until interior
    flora-bench suite --report-only --out runs/suite       # score what ran
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .. import core
from . import runner, score, space, workloads

HELP = "the selection suite: momentum forms x ranks x 6+ kinds of task, lr grid, seeds, worst case"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=",".join(workloads.TASKS), help=f"comma-separated, of {', '.join(workloads.TASKS)}")
    p.add_argument("--forms", default=",".join(space.FORMS), help="Flora FORM-PROJECTION candidates")
    p.add_argument("--ranks", default=",".join(map(str, space.RANKS)))
    p.add_argument("--baselines", default=",".join(space.BASELINES))
    p.add_argument("--seeds", type=int, default=space.SEEDS)
    p.add_argument("--kappas", default=str(space.KAPPA), help="Flora's kappa; the first is the primary setting")
    p.add_argument("--lrs", default=None, help="override every task's lr grid: comma-separated values")
    p.add_argument("--extend-lr", type=int, default=0, metavar="N",
                   help="while the best lr (mean validation loss over the seeds) of a (task, optimizer, kappa) is "
                        "an end of the lrs tried, run the next one beyond it (a step of the grid's own ratio: x2 on "
                        "a grid of doublings), at most N beyond the grid; the report marks a chosen lr still at an "
                        "edge")
    p.add_argument("--scale", type=float, default=1.0, help="scale steps and evaluation (smoke tests: 0.05)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default="runs/suite-data", help="the portable data folder")
    p.add_argument("--out", default="runs/suite")
    p.add_argument("--resume", action="store_true", help="keep the runs already in OUT/runs.jsonl")
    p.add_argument("--staged", action="store_true",
                   help="the whole study, most useful first: candidates (--forms x --ranks) on seed 0, peers on "
                        "seed 0, candidates on the other seeds (--seeds), then the default form at ranks 4 and 128 "
                        "and --forms at rank 8 with kappa 1000")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-plots", action="store_true")


def _list(p, flag, text, check=None):
    return core.checked_list(p, flag, text, check) if check else [x for x in text.split(",") if x]


def check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    def known(t):
        if t not in workloads.TASKS:
            raise ValueError(f"unknown task {t!r}; valid: {', '.join(workloads.TASKS)}")

    a.task_list = _list(p, "--tasks", a.tasks, known)
    core.refuse_empty(p, a, "--lrs")  # "" had fallen back to the default grids silently (probe Z134)
    try:
        a.rank_list = [int(r) for r in a.ranks.split(",") if r]
        a.kappa_list = [int(k) for k in a.kappas.split(",") if k]
        a.lr_list = [float(x) for x in a.lrs.split(",")] if a.lrs else None
    except ValueError as e:
        p.error(f"--ranks, --kappas and --lrs take numbers: {e}")
    if not a.task_list:
        p.error(f"--tasks names no task; valid: {', '.join(workloads.TASKS)}")
    if a.lr_list is not None and not (a.lr_list and all(math.isfinite(x) and x > 0 for x in a.lr_list)):
        p.error(f"--lrs takes comma-separated finite numbers above 0, got {a.lrs!r}")
    for flag, values in (("--ranks", a.rank_list), ("--kappas", a.kappa_list)):
        if not values or min(values) < 1:  # 0 would fail inside every run; the first kappa is the primary one
            p.error(f"{flag} takes comma-separated integers of at least 1, got {getattr(a, flag[2:])!r}")
    for flag, values in (("--ranks", a.rank_list), ("--kappas", a.kappa_list), ("--lrs", a.lr_list or [])):
        core.refuse_repeats(p, flag, values)  # each job would run twice (a probe), as with --tasks
    core.check_at_least(p, a, 1, "--seeds", "--workers")
    core.check_at_least(p, a, 0, "--extend-lr")
    if not (math.isfinite(a.scale) and a.scale > 0):
        p.error(f"--scale must be finite and above 0, got {a.scale}")
    core.check_device(p, a.device)
    if a.staged:  # its plan fixes these: given, they were ignored while the report used --kappas' first
        given = [flag for flag, value, default in (("--lrs", a.lrs, None), ("--kappas", a.kappas, str(space.KAPPA)),
                                                   ("--baselines", a.baselines, ",".join(space.BASELINES)))
                 if value != default]
        if given:
            p.error(f"{', '.join(given)}: not used with --staged, whose plan sets the lrs, kappas and peers "
                    "(only --forms, --ranks and --seeds apply); run without --staged to choose them")
    if a.report_only:  # it reports the log as it is: these were ignored, silently (probe Z135); said, not
        # refused, as the run's own command with --report-only added is the usual way to ask for a report
        given = [flag for flag, value, default in (
            ("--forms", a.forms, ",".join(space.FORMS)), ("--ranks", a.ranks, ",".join(map(str, space.RANKS))),
            ("--baselines", a.baselines, ",".join(space.BASELINES)), ("--seeds", a.seeds, space.SEEDS),
            ("--lrs", a.lrs, None), ("--scale", a.scale, 1.0), ("--extend-lr", a.extend_lr, 0),
            ("--staged", a.staged, False), ("--prepare-only", a.prepare_only, False)) if value != default]
        if given:
            core.say(f"flora-bench suite --report-only: {', '.join(given)} not used: the report covers the runs in "
                     "OUT/runs.jsonl as they are (--tasks narrows it, --kappas names its primary kappa)")
    from .. import optimizers
    from .peers import PEERS

    def baseline(name):  # the suite's own peers, or any name flora-bench knows
        if name not in PEERS:
            try:
                optimizers.parse(name)
            except ValueError as e:
                raise ValueError(f"{e}; or one of the suite's peers: {', '.join(PEERS)}") from None

    def form(f):  # a FORM-PROJECTION, checked as the Flora name it makes
        optimizers.parse(f"flora-r{a.rank_list[0]}-{f}")

    a.optimizer_list = space.candidates(_list(p, "--forms", a.forms, form), a.rank_list,
                                        _list(p, "--baselines", a.baselines, baseline))
    if not a.optimizer_list and not (a.report_only or a.prepare_only):  # it wrote empty tables, exit 0 (Z134)
        p.error("--forms and --baselines name nothing to run; leave either out for its default")
    core.refuse_repeats(p, "--forms and --baselines", a.optimizer_list)  # a baseline spelt as a candidate
    core.refuse_aliases(p, "--forms and --baselines", [o for o in a.optimizer_list if o not in PEERS])


def report(out: Path, tasks: list[str], kappa: int, meta: dict, *, plots: bool, ran: bool = True) -> dict:
    # the tasks asked for, in every output alike (results.md had them, the CSV and JSON every task run)
    rows = [r for r in runner.read_log(out / "runs.jsonl") if r["task"] in tasks]
    adamw = json.loads((out / "adamw_state.json").read_text()) if (out / "adamw_state.json").exists() else {}
    tasks = [t for t in tasks if any(r["task"] == t for r in rows)] or tasks
    chosen = score.choose(rows, kappa)  # kappa: --kappas' first, the primary setting
    gap = score.gaps(chosen)
    ranks = [r for k in sorted({c["kappa"] for c in chosen}) for r in score.ranking(chosen, k, tasks)]
    failed = score.failed(rows, kappa)  # candidates with no run that finished: listed, not dropped
    line = core.meta_line(meta) if meta else ""
    if meta and meta.get("earlier"):  # a resumed sweep: the parts before this session ran elsewhere, perhaps
        # with other options (their runs are in the tables too: a probe found the command alone misleading)
        line += " Earlier parts of this log: " + "; ".join(
            core.meta_line(m) + (f" (`{m['command']}`)" if m.get("command") else "") for m in meta["earlier"])
    md = score.markdown(chosen, gap, ranks, adamw, tasks, line, kappa, failed,
                        command=meta.get("command", "") if meta else "")
    (out / "results.md").write_text(md)
    score.write_csv(out / "results.csv", chosen)
    core.write_json(out / "results.json", {"meta": meta, "chosen": chosen, "failed": failed, "gaps": gap,
                                           "ranking": ranks, "adamw_state_bytes": adamw, "runs": len(rows)})
    if plots:
        score.plot(out / "loss_vs_state.png", chosen, tasks, kappa)
    elif ran and (out / "loss_vs_state.png").exists():  # drawn before this session's runs: it would disagree
        (out / "loss_vs_state.png").unlink()
        core.say(f"flora-bench suite --no-plots: removed {out / 'loss_vs_state.png'}, drawn from earlier runs")
    return {"markdown": md, "chosen": chosen, "ranking": ranks, "failed": failed}


def primary_kappa(a: argparse.Namespace, meta: dict, rows: list[dict] = ()) -> int:
    """--report-only: the primary kappa of the run that wrote ``meta`` (its --kappas' first),
    unless --kappas was given; the default had been used, filing a --kappas 50 sweep's
    goal check and dominance under the library's kappa. Without a meta.json (a log copied
    alone), the kappa of the log's runs where they hold one (probe Z59: a kappa-1000 log
    had been reported under the default 100, its goal check empty)."""
    if a.kappas != str(space.KAPPA):
        return a.kappa_list[0]
    if meta.get("kappas"):
        return int(meta["kappas"][0])
    held = {r.get("kappa") for r in rows if r.get("kappa") is not None}
    return int(held.pop()) if len(held) == 1 else a.kappa_list[0]


REPORT_FILES = ("results.md", "results.csv", "results.json", "loss_vs_state.png", "meta.json")


def set_aside(log: Path) -> Path:
    """Move ``log`` to the first free name of runs.previous.jsonl, runs.previous.2.jsonl, ...
    (an earlier runs.previous.jsonl had been overwritten) and return that name. The report
    files made from it go with it (results.previous.md, ...): left, they described the old
    runs beside the new log until the new report replaced them (a probe: an interrupted
    run left them so)."""
    def names(n):
        suffix = "previous" if n == 1 else f"previous.{n}"
        return [log.with_name(f"runs.{suffix}.jsonl")] + [
            log.with_name(f"{Path(name).stem}.{suffix}{Path(name).suffix}") for name in REPORT_FILES]

    n = 1
    while any(f.exists() for f in names(n)):  # a free number for the log and its reports alike
        n += 1
    dest, *reports = names(n)
    log.rename(dest)
    for name, to in zip(REPORT_FILES, reports):
        if (f := log.with_name(name)).exists():
            f.rename(to)
    return dest


def other_lengths(rows: list[dict], scale: float) -> list[str]:
    """The runs of a log that are not of this ``--scale``: by the scale they record, or, in
    a log from before they recorded it (2026-12-03), by their steps (such a log had passed
    at any --scale, its runs kept beside runs of another length: a probe)."""
    other = set()
    for r in rows:
        if "scale" in r:
            if r["scale"] != scale:
                other.add(f"--scale {r['scale']}")
        elif "steps" in r and r.get("task") in workloads.TASKS:
            want = workloads.scaled(workloads.TASKS[r["task"]], scale).steps
            if r["steps"] != want:
                other.add(f"{r['task']} runs of {r['steps']} steps where this --scale runs {want}")
    return sorted(other)


def run(a: argparse.Namespace, argv: list[str]) -> int:
    out, folder = Path(a.out), Path(a.data)
    if a.report_only and not runner.read_log(out / "runs.jsonl"):  # an empty report would read as a result
        core.say(f"flora-bench suite --report-only: no runs in {out / 'runs.jsonl'}; run the suite with "
                 f"--out {out} first, or give the --out it wrote to")
        return 2
    if a.report_only and not any(r["task"] in a.task_list for r in runner.read_log(out / "runs.jsonl")):
        core.say(f"flora-bench suite --report-only: no runs of --tasks {','.join(a.task_list)} in "
                 f"{out / 'runs.jsonl'}")
        return 2
    if not a.report_only:
        from .data import prepare

        prepare(folder)
        if a.prepare_only:  # the data only: no --out made (an empty one had been left, probe Z135)
            core.say(f"suite data in {folder}")
            return 0
    out.mkdir(parents=True, exist_ok=True)
    device = core.resolve_device(a.device)
    meta = core.run_metadata("suite", argv, device)
    meta["kappas"] = a.kappa_list  # the first is the primary one: --report-only reads it back
    kappa = a.kappa_list[0]
    if not a.report_only:
        log = out / "runs.jsonl"
        if log.exists() and not a.resume:
            core.say(f"flora-bench suite: without --resume a new log is started; the old one is now "
                     f"{set_aside(log)} (its report files beside it, named .previous too)")
        other = other_lengths(runner.read_log(log), a.scale)
        if other:  # a run's steps follow --scale: kept beside these, the longer runs would win every grid
            core.say(f"flora-bench suite --resume: {log} holds runs of another length ({'; '.join(other)}), this "
                     f"command asks for --scale {a.scale}; resume with the same --scale, or give another --out")
            return 2
        shared = sum(r.get("task") == "finetune" and r.get("seed", 0) != 0 and "base_init" not in r
                     for r in runner.read_log(log))
        if shared:  # said, not refused: the runs between 2e7f1e1 and the field's arrival had a base per seed too
            core.say(f"flora-bench suite --resume: {log} holds {shared} finetune run(s) of seeds above 0 that "
                     "record no base_init: until 2026-12-06 every seed fine-tuned one base (init 4321), since "
                     "then seed s fine-tunes its own (4321 + s), so such runs may not compare with new ones; "
                     "drop them from the log, or give another --out, if they are that old")
        if a.staged:
            jobs = space.staged_plan(a.task_list, a.seeds, _list(None, "--forms", a.forms), a.rank_list)
        else:
            jobs = space.plan(a.task_list, a.optimizer_list, a.seeds, tuple(a.kappa_list),
                              {t: tuple(a.lr_list) for t in a.task_list} if a.lr_list else None)
        from tqdm.auto import tqdm

        if a.resume and (out / "meta.json").exists():  # the sessions before this one ran part of the log
            old = json.loads((out / "meta.json").read_text())
            meta["earlier"] = old.pop("earlier", []) + [old]
        (out / "meta.json").write_text(json.dumps(meta))
        planned, first = list(jobs), list(jobs)  # the cap counts lrs beyond the grids of the first plan

        def extensions():  # each round of lr extensions (--extend-lr), in the same workers
            seen = {j.key for j in planned}
            new = [j for j in space.extensions(first, runner.read_log(log), a.extend_lr) if j.key not in seen]
            planned.extend(new)
            if new:
                core.say(f"suite: extending {len({(j.task, j.optimizer, j.kappa) for j in new})} lr grid(s): "
                         + ", ".join(sorted({f"{j.task}:{j.optimizer}@{j.lr:g}" for j in new})))
            return new

        try:
            if jobs:
                runner.run_all(jobs, a.task_list, log=log, folder=folder, device=device, workers=a.workers,
                               scale=a.scale, more=extensions,
                               progress=(lambda total: tqdm(total=total, desc="suite", dynamic_ncols=True))
                               if core.interactive() else None)  # in a log: a line per run (runner)
        except runner.WorkerLost as e:
            core.say(f"flora-bench suite: {e}")
            return 1
        (out / "meta.json").write_text(json.dumps(meta))
    else:
        saved = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
        kappa = primary_kappa(a, saved, runner.read_log(out / "runs.jsonl"))
        if saved:  # the run's metadata (its command ran the rows), and this report's command beside it
            meta = {**saved, "report_command": meta["command"]}
        else:  # this command's metadata, with the kappa the log was run at first
            meta["kappas"] = [kappa] + [k for k in a.kappa_list if k != kappa]
    res = report(out, a.task_list, kappa, meta, plots=not a.no_plots, ran=not a.report_only)
    print(res["markdown"])
    rows = runner.read_log(out / "runs.jsonl")
    if not a.report_only and rows and not any(r.get("status") in ("ok", "diverged") for r in rows):
        core.say("flora-bench suite: every run failed (see runs.jsonl)")  # exit 1: a script sees it
        return 1
    return 0
