"""``flora-bench train`` (the default subcommand): train real models side by side with
every optimizer, pick each one's lr on a validation split, and write JSON, CSV, Markdown
and PNG results to a run folder."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from . import config, core

HELP = "side-by-side training benchmark (the default)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="quick", choices=list(config.SIZES),
                   help="quick (default, ~8 min on 2 CPU cores), full (every optimizer, 3-point lr sweep, "
                        "larger models), smoke (seconds; for tests)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated subset of {','.join(config.TASKS)} (default: all; smoke: pretrain)")
    p.add_argument("--optimizers", default=None,
                   help="comma-separated optimizer names for every selected task (default: the size's list); "
                        "e.g. adamw,adafactor-b0.9,flora-r32,flora-r32-paper,lora-r32,galore-r32,apollo-r32,"
                        "flora-opt-r32,adamw+ca-r32")
    p.add_argument("--preset", default=None, choices=list(config.PRESETS),
                   help="a sweep instead of the size's optimizer lists: "
                        + "; ".join(f"{k}: {v.about} ({', '.join(v.tasks)}; every Flora form at --ranks, "
                                    f"{v.lr_points} lrs, grid extended up to {v.extend_lr} times)"
                                    for k, v in config.PRESETS.items()))
    p.add_argument("--ranks", default=None,
                   help="with --preset: comma-separated Flora ranks (default: the size's, below the model width: "
                        + "; ".join(f"{k} {','.join(map(str, v))}" for k, v in config.RANKS.items()) + ")")
    p.add_argument("--extend-lr", type=int, default=None, metavar="N",
                   help="while an optimizer's best lr (mean over seeds) is the lowest or highest of its grid, run "
                        "the next lr beyond it (x3 or /3 on the 1-3-10 grids), at most N times; a row still on the "
                        "edge is marked; a grid of one lr has no edge and is not extended (default: the size's, 2 "
                        "for quick, 0 for smoke and full, or the preset's)")
    p.add_argument("--scale-parameter", action="store_true",
                   help="Adafactor, Flora, flora-opt and LoRA's Adafactor with scale_parameter=True (HF's default: "
                        "lr relative to each parameter's RMS) instead of the bench's False")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the size's)")
    p.add_argument("--lr-points", type=int, default=None, help="lr values swept per optimizer (1-3)")
    p.add_argument("--lrs", default=None,
                   help="explicit lrs instead of the sweep grid: KEY=LR[/LR...] entries, comma-separated, KEY an "
                        "optimizer name or an lr family (adam: AdamW/GaLore/APOLLO, adafactor: Adafactor/Flora/"
                        "flora-opt, lora), e.g. adam=1e-3,adafactor=1e-3/3e-3,lora=3e-3")
    p.add_argument("--tau", type=int, default=None,
                   help="micro-batches per optimizer step in every selected task (default: the size's: "
                        "finetune 2 or 8, the others 1); compressed-accumulation rows (+ca-rR) need tau > 1")
    p.add_argument("--seed", type=int, default=0, help="the first run seed (model init, data order, projections)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="repeat every (optimizer, lr) on seeds SEED..SEED+N-1; the lr is chosen on the mean "
                        "validation score and the tables give mean +- std (N-1) over the seeds (default 1)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="run folder (default runs/bench/<timestamp>; runs/bench/latest "
                                               "points at the newest)")
    p.add_argument("--cache", default=None, help="cache folder for tokenized data and the converted SmolLM2 "
                                                 "(default runs/bench/cache or $FLORA_BENCH_CACHE)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per run (default: the cores shared equally among --workers runs; "
                        "torch's choice, one per core, with one worker)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="runs at a time, each in its own process with an equal share of the cores' threads "
                        "(default: 2 on a CPU with 2 or more cores, 1 on a GPU or with --no-isolate)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every training in this process (peak RSS then covers all runs so far)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (there are none anyway when stderr is not a terminal: one line per "
                        "finished run instead)")
    p.add_argument("--resume", default=None, metavar="RESULTS_JSON",
                   help="continue an interrupted run with the same options: the runs of this plan that finished "
                        "(ok or diverged) in RESULTS_JSON are kept, the others (and lr extensions still due) run; "
                        "its runs outside this plan (a narrower --optimizers, --tasks or --seed) stay in the results; "
                        "writes to --out (default: RESULTS_JSON's folder)")
    p.add_argument("--from-json", default=None, metavar="RESULTS_JSON",
                   help="train nothing: re-read a results.json (e.g. of an interrupted run; several, comma-separated, "
                        "are merged) and rewrite table, CSV, Markdown and plots into --out (default: the first's "
                        "folder)")


def check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse bad input before anything runs, naming what is valid."""
    from . import optimizers as bo

    core.check_at_least(p, a, 1, "--steps")
    if a.lr_points is not None and not 1 <= a.lr_points <= 3:
        p.error("--lr-points must be 1, 2 or 3")
    core.refuse_empty(p, a, "--lrs")  # "" had fallen back to the default grids silently (probe Z134)
    if a.lrs:
        a.lrs = _parse_lrs(p, a.lrs)
    core.check_at_least(p, a, 1, "--tau", "--workers")
    if a.workers is not None and a.workers > 1 and a.no_isolate:
        p.error("--workers > 1 needs runs in processes of their own: drop --no-isolate or use --workers 1")
    core.check_at_least(p, a, 1, "--seeds")
    if a.extend_lr is not None and a.extend_lr < 0:
        p.error("--extend-lr must be >= 0")
    if a.ranks is not None:
        if a.preset is None:
            p.error("--ranks needs --preset (elsewhere the rank is part of the optimizer name, e.g. flora-r16)")
        try:
            a.ranks = tuple(int(r) for r in a.ranks.split(",") if r.strip())
        except ValueError:
            p.error(f"--ranks: expected comma-separated integers, got {a.ranks!r}")
        if not a.ranks or any(r < 1 for r in a.ranks):
            p.error("--ranks must be >= 1")
        core.refuse_repeats(p, "--ranks", a.ranks)  # each preset run had run twice (a probe)
    if a.resume and (a.from_json or not Path(a.resume).is_file()):
        p.error("--resume: needs an existing results.json, and no --from-json" if a.from_json
                else f"--resume: no such file {a.resume!r}")
    if a.preset is not None and a.optimizers:
        p.error("--preset and --optimizers exclude each other (the preset names the optimizers)")
    core.refuse_empty(p, a, "--tasks", "--optimizers")
    a.tasks = tuple(t.strip() for t in a.tasks.split(",") if t.strip()) if a.tasks else None
    core.refuse_repeats(p, "--tasks", a.tasks or ())  # dropped silently, as no other list was (probe Z105)
    for t in a.tasks or ():
        if t not in config.TASKS:
            p.error(f"--tasks: unknown task {t!r}; valid tasks: {', '.join(config.TASKS)}")
    a.optimizers = [o.strip() for o in a.optimizers.split(",") if o.strip()] if a.optimizers else None
    core.refuse_repeats(p, "--optimizers", a.optimizers or ())
    for o in a.optimizers or ():
        try:
            bo.parse(o)
        except ValueError as e:
            p.error(f"--optimizers: {e}")
    core.refuse_aliases(p, "--optimizers", a.optimizers or ())
    # What follows would otherwise fail inside every run (exit 0), after a run, or be ignored.
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1 (torch CPU threads per run), got {a.threads}")
    core.check_device(p, a.device)
    core.check_seed(p, a.seed)  # Flora's seed range: every Flora row would fail inside its run
    if a.from_json:
        for path in a.from_json.split(","):
            why = _not_train_results(Path(path))
            if why:
                p.error(f"--from-json: {path!r} {why}; give results.json files written by flora-bench train")
    if a.resume and _not_train_results(Path(a.resume)):
        p.error(f"--resume: {a.resume!r} {_not_train_results(Path(a.resume))}; give the results.json of an "
                "interrupted flora-bench train")
    if isinstance(a.lrs, dict) and not a.from_json:
        _check_lrs(p, a)


def _parse_lrs(p: argparse.ArgumentParser, text: str) -> dict[str, tuple[float, ...]]:
    """--lrs KEY=LR[/LR...],...: a key or one key's lr given twice is refused (an lr twice
    ran twice, reported as two seeds with a spread of 0; a key twice dropped the first)."""
    try:
        pairs = [(k.strip(), v) for k, v in (e.split("=", 1) for e in text.split(",") if e.strip())]
        lrs = {k: tuple(float(x) for x in v.split("/")) for k, v in pairs}
    except ValueError:
        p.error("--lrs: expected KEY=LR[/LR...] entries, e.g. adam=1e-3,lora=3e-3/1e-2")
    core.refuse_repeats(p, "--lrs", [k for k, _ in pairs])
    for k, values in lrs.items():
        core.refuse_repeats(p, f"--lrs {k}", [f"{x:g}" for x in values])
    return lrs


def _not_train_results(path: Path) -> str | None:
    """Why ``path`` is not a results.json of the train subcommand, or None."""
    if not path.is_file():
        return "is not a file"
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"is not JSON ({type(e).__name__})"
    meta = d.get("meta") if isinstance(d, dict) else None
    if isinstance(meta, dict) and meta.get("subcommand", "train") != "train":
        return f"holds the results of flora-bench {meta['subcommand']}, not train"
    if not isinstance(meta, dict) or not isinstance(d.get("runs"), list) or not isinstance(meta.get("tasks"), dict):
        return "is not a train results.json (no meta.tasks and runs)"
    return None


def _check_lrs(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """--lrs: lrs above 0 (nan: a run that fails, as tests use), keys among the optimizers
    that run and their lr families (a misspelt key was silently ignored)."""
    from . import optimizers as bo

    for k, lrs in a.lrs.items():
        if any(x <= 0 or math.isinf(x) for x in lrs):
            p.error(f"--lrs {k}: lrs must be finite and above 0, got {'/'.join(f'{x:g}' for x in lrs)}")
    preset = config.PRESETS[a.preset] if a.preset else None
    tasks = a.tasks or (preset.tasks if preset else ("pretrain",) if a.size == "smoke" else config.TASKS)
    names = list(dict.fromkeys(o for t in tasks for o in config.task_config(
        a.size, t, optimizers=a.optimizers, preset=a.preset, ranks=a.ranks).optimizers))
    families = list(dict.fromkeys(bo.parse(o).lr_family for o in names))
    unknown = [k for k in a.lrs if k not in names and k not in families]
    if unknown:
        p.error(f"--lrs: {', '.join(map(repr, unknown))} is not an optimizer that runs nor its lr family; valid keys: "
                f"{', '.join(names + [f for f in families if f not in names])}")


def _describe(task: str, cfg: config.TaskConfig, model_params: int | None) -> str:
    params = f"{model_params / 1e6:.2f}M params" if model_params else ""
    # the lrs tried are each row's (--lrs and grid extension change them; a count here had not)
    lr_note = "lr: picked on validation among those each row lists as tried"
    micro = f"tau={cfg.tau} micro-batches of " if cfg.tau > 1 else ""
    if task == "pretrain":
        what = (f"Llama {cfg.layers} layers x {cfg.hidden} wide ({params}), byte-level, from scratch on "
                f"KJV + BBC text; {cfg.steps} steps of {micro}{cfg.batch} x {cfg.seq} bytes")
    elif task == "finetune":
        what = (f"SmolLM2-135M ({params}) on BBC News text; {cfg.steps} steps of tau={cfg.tau} micro-batches "
                f"of {cfg.batch} x {cfg.seq} tokens")
        if cfg.steps < 50:  # a few steps at one lr rank nothing: what this row measures is memory
            what += (f". A memory measurement only: {cfg.steps} steps say nothing about quality (the selection "
                     f"suite's fine-tuning task does: flora-bench suite)")
    else:
        what = (f"all-MiniLM-L6-v2 ({params}) + 5-way head on BBC News topics; {cfg.steps} steps of "
                f"{micro}{cfg.batch} articles x {cfg.seq} tokens; accuracy on {cfg.eval_examples} held-out articles")
    return f"{what}; kappa (projection refresh, also GaLore/APOLLO update_proj_gap) = {cfg.kappa}; {lr_note}."


def plan(args, cfgs: dict[str, config.TaskConfig], peers: dict[str, str], device: str, cache: Path):
    """(jobs to run, results of the optimizers that cannot run here, with why)."""
    from . import optimizers as bo
    from .records import Job, RunResult

    jobs, skipped = [], []
    for t in sorted(cfgs, key=lambda t: config.RUN_ORDER.index(t) if t in config.RUN_ORDER else len(config.TASKS)):
        cfg = cfgs[t]
        for name in cfg.optimizers:
            spec = bo.parse(name)
            why = None
            if spec.is_peer and peers[spec.peer_module] != "ok":
                why = f"unavailable: {spec.peer_module} not importable ({peers[spec.peer_module]})"
            elif spec.accumulate_rank is not None and cfg.tau <= 1:
                why = tau_na(t, cfg, args.tau, finetune_only=getattr(args, "tau_finetune_only", False))
            if why:
                skipped.append(RunResult(task=t, optimizer=name, lr=float("nan"), seed=args.seed, status=why))
                continue
            lrs = bo.lr_grid(spec, t, cfg.lr_points)
            if args.lrs:
                lrs = args.lrs.get(name, args.lrs.get(spec.lr_family, lrs))
            jobs += [Job(task=t, optimizer=name, lr=lr, cfg=cfg, seed=seed, device=device, cache_dir=str(cache),
                         threads=args.threads or cfg.threads) for lr in lrs for seed in seeds_of(args)]
    return jobs, skipped


def tau_na(task: str, cfg: config.TaskConfig, tau: int | None, *, finetune_only: bool = False) -> str:
    """Why a ``+ca-rR`` optimizer is not run on ``task`` (its tau is 1), saying how to
    give it more micro-batches a step (``finetune_only``: a resume of results written when
    ``--tau`` set the finetune task's alone, which keeps that rule)."""
    if finetune_only and tau is not None and task != "finetune":
        how = (f"; these results were written when --tau applied to the finetune task only, and their resume "
               f"keeps that rule: --tau {tau} does not reach {task}")
    else:
        how = "" if tau is not None else "; --tau N sets N micro-batches a step"
    return f"n/a: compressed accumulation needs tau > 1 ({task} runs tau={cfg.tau}{how})"


def seeds_of(args) -> list[int]:
    """The run seeds: ``--seed`` and the ``--seeds - 1`` after it."""
    return list(range(args.seed, args.seed + getattr(args, "seeds", 1)))


def _result_line(res, i: int, n: int, seeded: bool = False) -> str:
    what = res.status
    if res.ok:
        scores = [f"{k} {getattr(res, k):.4g}" for k in ("val_loss", "val_accuracy") if getattr(res, k) is not None]
        what += ", " + ", ".join(scores) if scores else ""
    seed = f" seed {res.seed}" if seeded else ""
    return f"[{i}/{n}] {res.task}:{res.optimizer}@{res.lr:g}{seed}: {what} ({res.wall_s or 0:.1f} s)"


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import dataclasses

    import torch

    from . import optimizers as bo
    from . import report
    from .runner import Runner, cache_dir_default

    if args.from_json:
        return rewrite([Path(p) for p in args.from_json.split(",")], Path(args.out) if args.out else None)
    t0 = time.perf_counter()
    device = core.resolve_device(args.device)
    preset = config.PRESETS[args.preset] if args.preset else None
    tasks = args.tasks or (preset.tasks if preset else ("pretrain",) if args.size == "smoke" else config.TASKS)
    out = Path(args.out) if args.out else Path(args.resume).parent if args.resume else core.default_out("train")
    args.out_resolved = out  # for the interrupt's message (flora.bench.__main__)
    cache = Path(args.cache) if args.cache else cache_dir_default()
    legacy_tau = args.tau_finetune_only = bool(args.resume) and _tau_finetune_only(Path(args.resume), args.size)
    if legacy_tau and args.tau is not None and any(t != "finetune" for t in tasks):
        core.say(f"flora-bench train: --resume: {args.resume} was written when --tau applied to the finetune task "
                 f"only (before 2026-12-07), and its resume keeps that rule: "
                 f"{', '.join(t for t in tasks if t != 'finetune')} step(s) at the size's tau")
    cfgs = {t: config.task_config(args.size, t, steps=args.steps, optimizers=args.optimizers, lr_points=args.lr_points,
                                  tau=None if legacy_tau and t != "finetune" else args.tau, preset=args.preset,
                                  ranks=args.ranks, scale_parameter=args.scale_parameter, extend_lr=args.extend_lr)
            for t in tasks}
    peers = bo.peer_status()
    jobs, skipped = plan(args, cfgs, peers, device, cache)
    progress = not args.no_progress and core.interactive()
    jobs = [dataclasses.replace(j, progress=progress) for j in jobs]
    planned = list(jobs)

    core.say(f"flora-bench train: size={args.size} tasks={','.join(tasks)} device={device} runs={len(jobs)} "
             f"out={out}")
    for name, st in peers.items():
        if st != "ok":
            core.say(f"  peer {name}: {st}")
    meta = core.run_metadata("train", argv, device)
    meta.update(size=args.size, seed=args.seed, seeds=seeds_of(args), peers=peers,
                runs_planned=len(jobs) + len(skipped), preset=args.preset, tau_every_task=not legacy_tau,
                lr_extension={"grids": {}, "extended": {}, "capped": []})
    grids = {}  # (task, optimizer) -> the lrs planned first
    for j in jobs:
        if j.lr not in grids.setdefault((j.task, j.optimizer), []):
            grids[j.task, j.optimizer].append(j.lr)
    meta["lr_extension"]["grids"] = {f"{t}:{o}": g for (t, o), g in grids.items()}

    runs = list(skipped)
    if args.resume:
        why = resume_mismatch(Path(args.resume), cfgs, args.size, device)
        if why:
            print(f"flora-bench train: error: --resume: {why}", file=sys.stderr)
            return 2
        jobs, kept, others = resume(jobs, Path(args.resume), meta)
        # a row of what could not run (n/a, unavailable) that this plan made again: not kept twice
        remade = {(r.task, r.optimizer) for r in skipped}
        others = [r for r in others if not (r.status.startswith(("n/a", "unavailable"))
                                            and (r.task, r.optimizer) in remade)]
        runs += kept + others
        for label, grid in meta["lr_extension"]["grids"].items():  # the old grid's lrs: no extensions
            grids[tuple(label.split(":", 1))] = grid
        due = []  # the pairs that had finished their lrs: is an extension still due?
        for key, job in {(j.task, j.optimizer): j for j in planned}.items():
            if not any((j.task, j.optimizer) == key for j in jobs):
                due += _extend(job, jobs, runs, grids, meta["lr_extension"])
        jobs = due + jobs
        core.say(f"  resumed from {args.resume}: {len(kept)} runs kept, {len(jobs)} to run"
                 + (f"; {len(others)} runs outside this plan stay in the results" if others else ""))
    runner = Runner(isolate=not args.no_isolate, device=device)
    workers = workers_for(args, device, runner.isolate)
    if workers > 1:  # each run gets its share of the cores' threads, and no per-step bar (they would clash)
        share = max(1, core.usable_cores() // workers)  # the cores this process may use (taskset)
        jobs = [dataclasses.replace(j, threads=args.threads or min(j.threads or share, share), progress=False)
                for j in jobs]
    meta["workers"] = workers
    # The runs' thread counts (what each run process sets; torch's default where unset), not the parent's.
    per_run = {j.task: j.threads or torch.get_num_threads() for j in jobs or planned}
    if per_run:
        counts = sorted(set(per_run.values()))
        meta["threads_per_run"] = per_run
        meta["device_name"] = core.device_name(device, counts[0] if len(counts) == 1 else
                                               "/".join(f"{n} ({t})" for t, n in per_run.items()), workers)
    core.say(f"  {workers} run(s) at a time" + (f", {jobs[0].threads} torch thread(s) each" if workers > 1 and jobs
                                                 else ""))
    _run_jobs(jobs, runs, workers=workers, runner=runner, cfgs=cfgs, cache=cache, seed=args.seed,
              seeded=args.seeds > 1, progress=progress, grids=grids, record=meta["lr_extension"],
              save=lambda: _finish(out, runs, cfgs, meta, t0, plots=False, partial=True))
    # in the plan's order, not the order the runs finished in (two workers: either)
    order = {label: i for i, label in enumerate(meta["lr_extension"]["grids"])}
    meta["lr_extension"]["capped"].sort(key=lambda label: order.get(label, len(order)))
    rows, meta, paths = _finish(out, runs, cfgs, meta, t0, plots=True)
    if not args.out and not args.resume:  # a new default folder (a resumed run keeps its own)
        _point_latest(out)
    report.print_table(rows, _metrics(meta["tasks"]))
    core.say(f"wrote {', '.join(str(p) for p in paths.values())} ({meta['wall_s'] / 60:.1f} min)")
    return exit_code(runs)


def exit_code(runs) -> int:
    """1 when runs were planned and none finished (ok or diverged): a script sees the failure."""
    if runs and not any(r.ok or r.status == "diverged" for r in runs):
        core.say("flora-bench train: every run failed or could not run (see the status column)")
        return 1
    return 0


def workers_for(args, device: str, isolated: bool) -> int:
    """Runs at a time: ``--workers``, else 2 on a CPU with two or more cores when runs are
    isolated (the quick size's runs are small: two 1-thread runs in parallel finish sooner
    than one 2-thread run after another), else 1 (a GPU, or runs in this process)."""
    if args.workers is not None:
        return args.workers
    return 2 if device == "cpu" and isolated and core.usable_cores() >= 2 else 1


def _run_jobs(jobs: list, runs: list, *, workers: int, runner, cfgs, cache: Path, seed: int, seeded: bool,
              progress: bool, grids: dict, record: dict, save) -> None:
    """Run ``jobs``, ``workers`` at a time (each in its own process, from a thread here),
    appending each result to ``runs`` as it finishes. When the last run of a (task,
    optimizer) has finished -- none of its runs pending or in flight -- the lr extension is
    planned (:func:`_extend`) and put first in the queue. ``save()`` after every run writes
    the partial results, so they survive a kill. A task's data is prepared before its
    first run starts."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from .runner import run_train_job
    from .tasks import make_task

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="flora-bench", position=0, dynamic_ncols=True)
    write = bar.write if bar is not None else core.say
    pending, running, prepared = list(jobs), {}, set()  # running: future -> (submission number, job)
    done, total, submitted = 0, len(jobs), 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                if job.task not in prepared:
                    if bar is not None:
                        bar.set_description(f"preparing {job.task}")
                    make_task(job.task, cfgs[job.task], cache, seed).prepare()
                    prepared.add(job.task)
                running[pool.submit(run_train_job, runner, job)] = (submitted, job)
                submitted += 1
                if bar is not None:
                    bar.set_description(" | ".join(j.label for _, j in running.values()))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in sorted(finished, key=lambda f: running[f][0]):
                _, job = running.pop(fut)
                res = fut.result()
                runs.append(res)
                done += 1
                write(_result_line(res, done, total, seeded))
                if bar is not None:
                    bar.update(1)
                more = _extend(job, pending + [j for _, j in running.values()], runs, grids, record)
                if more:
                    pending[0:0] = more
                    total += len(more)
                    if bar is not None:
                        bar.total = total
                        bar.refresh()
                save()
    if bar is not None:
        bar.close()


# Task settings a resumed run may change (which optimizers and lrs run, and threads); every
# other field of config.TaskConfig shapes what a run computes and must equal the saved run's.
RESUME_MAY_CHANGE = ("optimizers", "lr_points", "extend_lr", "threads")


def _tau_finetune_only(path: Path, size: str) -> bool:
    """Whether the results at ``path`` were written when ``--tau`` set the finetune task's
    micro-batches only (before 2026-12-07): their resume keeps that rule, so that the
    command that made them continues them (a review). Results since say which rule they
    ran under (``tau_every_task``); older ones did under the old rule unless a task other
    than finetune ran another tau than its size's (the commit that changed the rule wrote
    no marker: a review)."""
    try:  # the metadata alone (report.merge would say the file's merge warnings again)
        meta = json.loads(path.read_text()).get("meta") or {}
    except (OSError, ValueError, AttributeError):  # not results: resume_mismatch and resume say why
        return False
    if "tau_every_task" in meta:
        return not meta["tau_every_task"]
    try:  # odd metadata (a size that is a list, a task that is a string): resume_mismatch says what is wrong
        defaults = config.SIZES.get(meta.get("size") or size, {})
        for task, info in (meta.get("tasks") or {}).items():
            tau = ((info or {}).get("config") or {}).get("tau")
            if task != "finetune" and task in defaults and tau is not None and tau != defaults[task].tau:
                return False
    except (TypeError, AttributeError):
        return False
    return True


def resume_mismatch(path: Path, cfgs: dict, size: str, device: str | None = None) -> str | None:
    """Why the runs at ``path`` cannot be continued with these task settings (or on this
    device), or None: kept runs of other settings were reported under this command's (a
    6-step run as 3 steps, smoke runs inside a quick plan; found by a new-user probe), and
    CPU runs' times and losses beside CUDA ones under one device name."""
    from . import report

    old_meta, _ = report.merge([path])
    if old_meta.get("size") not in (None, size):
        return f"{path} was run with --size {old_meta['size']}, this command has --size {size}; resume with the same"
    if device is not None and old_meta.get("device") not in (None, device):
        return (f"{path} was run on --device {old_meta['device']}, this command runs on {device}; resume on the "
                "same device, or give a new --out")
    for task, cfg in cfgs.items():
        old = (old_meta.get("tasks", {}).get(task) or {}).get("config") or {}
        new = cfg.to_dict()
        diff = [f"{k} {old[k]!r} there, {new[k]!r} here" for k in new
                if k not in RESUME_MAY_CHANGE and k in old and old[k] != new[k]]
        if diff:
            return (f"{path} ran task {task} with other settings ({'; '.join(diff)}); resume with the options "
                    "of that run, or give a new --out")
    return None


def resume(jobs: list, path: Path, meta: dict) -> tuple[list, list, list]:
    """(the jobs still to run, the runs kept, the runs outside this plan) when continuing
    the run whose results are at ``path``: its runs of the planned (task, optimizer) pairs
    and seeds that finished ok or diverged are kept (a failed one, perhaps killed with the
    sweep, runs again); each lr it ran of a planned pair (its grid's and those grid extension
    added), on any seed, is planned on this plan's seeds it misses (a new ``--seed`` had left
    them out, and a worse lr was chosen silently: an lr on fewer seeds is not compared;
    probe Z59). Its runs of pairs or seeds this plan leaves out (a narrower ``--optimizers``,
    ``--tasks`` or ``--seed``) stay in the results as they were: the results are written
    over the old ones, which had lost them. ``meta`` gets the old tasks, seeds and lr grids
    (an lr of the old grid is no extension of the new one)."""
    import dataclasses

    from . import report

    old_meta, old = report.merge([path])
    seeds = {j.seed for j in jobs}
    first = {}
    for j in jobs:
        first.setdefault((j.task, j.optimizer), j)
    mine = [r for r in old if (r.task, r.optimizer) in first and r.seed in seeds]
    others = [r for r in old if not ((r.task, r.optimizer) in first and r.seed in seeds)]
    kept = [r for r in mine if r.ok or r.status == "diverged"]
    done = {(r.task, r.optimizer, r.lr, r.seed) for r in kept}
    planned = {(j.task, j.optimizer, j.lr) for j in jobs}
    extra = {(r.task, r.optimizer, r.lr): first[r.task, r.optimizer] for r in old
             if (r.task, r.optimizer) in first and (r.ok or r.status == "diverged")
             and (r.task, r.optimizer, r.lr) not in planned}
    jobs = jobs + [dataclasses.replace(j, lr=lr, seed=seed) for (_, _, lr), j in extra.items() for seed in sorted(seeds)]
    was = old_meta.get("resumed_from") or {}  # the runs that one resumed, and so on (a file from
    before = was.get("wall_s_all", was.get("wall_s")) or 0  # before 2026-12-06 has that run's wall only)
    meta["resumed_from"] = {"results": str(path), "command": old_meta.get("command"), "wall_s": old_meta.get("wall_s"),
                            "wall_s_all": (old_meta.get("wall_s") or 0) + before}
    meta["tasks"] = old_meta.get("tasks") or {}  # _finish puts this plan's settings over them
    meta["seeds"] = sorted(set(meta.get("seeds") or []) | {r.seed for r in others})
    grids = meta["lr_extension"]["grids"]
    for label, grid in ((old_meta.get("lr_extension") or {}).get("grids") or {}).items():
        grids[label] = sorted(set(grids.get(label, [])) | set(grid))
    return [j for j in jobs if (j.task, j.optimizer, j.lr, j.seed) not in done], kept, others


def next_lr(tried: list[float], up: bool) -> float:
    """The lr beyond the highest (``up``) or lowest of ``tried``: half a decade on, rounded
    to one digit (x3 or /3: 1e-2 -> 3e-2 -> 1e-1) where the grid's last step is about half a
    decade (the 1-3-10 grids of ``config.LR_GRIDS``), else that last step once more."""
    lrs = sorted(x for x in tried if x == x)
    edge, inner = (lrs[-1], lrs[-2]) if up else (lrs[0], lrs[1])
    ratio = max(edge, inner) / min(edge, inner)
    if 2.9 <= ratio <= 3.5:
        return float(f"{10 ** ((round(2 * math.log10(edge)) + (1 if up else -1)) / 2):.0e}")
    return edge * ratio if up else edge / ratio


def extension(row, grid, cap: int) -> tuple[float | None, bool]:
    """Grid extension for one chosen row (``report.Chosen``: the lr with the best mean
    validation score): (the next lr to run, or None; whether ``cap`` stopped it). A further
    lr runs while the chosen one is the lowest or highest of two or more tried and scores
    better than its neighbour (not on a tie), at most ``cap`` of them beyond ``grid`` (the
    lrs planned first)."""
    if cap <= 0 or row.lr_edge is None or row.edge_tied:  # a tie (accuracy on a small split): flat
        return None, False
    beyond = [x for x in row.lrs_tried if x == x and not any(math.isclose(x, g, rel_tol=1e-9) for g in grid)]
    if len(beyond) >= cap:
        return None, True
    return next_lr(row.lrs_tried, row.lr_edge == "upper"), False


def _extend(job, pending, runs, grids, record) -> list:
    """After ``job``: when it was the last pending run of its (task, optimizer) and the best
    lr is an end of those tried, the jobs of the next lr (every seed); ``record["capped"]``
    gets the pairs still on the edge at the cap."""
    import dataclasses

    from . import report

    key = (job.task, job.optimizer)
    if not job.cfg.extend_lr or any((j.task, j.optimizer) == key for j in pending):
        return []
    mine = [r for r in runs if (r.task, r.optimizer) == key]
    if any(r.status.startswith("failed") for r in mine):
        # a crashed seed scores its lr -inf, which moves the best away from it: no verdict on the
        # grid's edge until --resume has run it again
        core.say(f"  {job.task}:{job.optimizer}: a run failed; its lr grid is not extended (--resume reruns it)")
        return []
    label = f"{job.task}:{job.optimizer}"
    if len({r.lr for r in mine if r.lr == r.lr}) < 2:  # said, not silently skipped (a probe)
        core.say(f"  {label}: one lr tried, so its grid has no edge to extend (--extend-lr needs two or more: "
                 "--lr-points 2+ or --lrs KEY=A/B)")
        return []
    row = report.choose(mine, _metrics([job.task]))[0]
    lr, capped = extension(row, grids[key], job.cfg.extend_lr)
    if capped and label not in record["capped"]:
        record["capped"].append(label)
    if lr is None:
        return []
    core.say(f"  {label}: best lr {row.run.lr:g} is the {row.lr_edge} end of {len(row.lrs_tried)} tried; "
             f"running lr {lr:g}")
    seeds = sorted({r.seed for r in mine})
    return [dataclasses.replace(job, lr=lr, seed=seed) for seed in seeds]


def _metrics(tasks) -> dict[str, str]:
    from .tasks import TASK_CLASSES

    return {t: TASK_CLASSES[t].metric for t in tasks}


def _ordered(rows, tasks, optimizers_of) -> list:
    order = {(t, o): i for i, (t, o) in enumerate((t, o) for t in tasks for o in optimizers_of(t))}
    return sorted(rows, key=lambda r: order.get((r.task, r.optimizer), 1 << 30))


def _finish(out, runs, cfgs, meta, t0, *, plots, partial=False):
    """Choose and write everything; ``partial``: a write while runs are still due (what a
    kill leaves behind says so)."""
    from . import report

    meta = dict(meta)
    meta["tasks"] = _tasks_info(cfgs, runs, meta.get("tasks") or {})
    metrics = _metrics(meta["tasks"])
    tasks = list(cfgs) + [t for t in meta["tasks"] if t not in cfgs]
    rows = _ordered(report.choose(runs, metrics), tasks, lambda t: meta["tasks"][t]["config"]["optimizers"])
    report.mark_capped(rows, meta)
    ext = meta.get("lr_extension")
    if ext:  # the lrs beyond each planned grid that ran
        ext["extended"] = {label: sorted({r.lr for r in runs if f"{r.task}:{r.optimizer}" == label
                                          and not any(math.isclose(r.lr, g, rel_tol=1e-9) for g in grid)})
                           for label, grid in ext["grids"].items()}
        ext["extended"] = {k: v for k, v in ext["extended"].items() if v}
    meta["runs_done"] = len(runs)
    if partial:
        meta["partial"] = True
    meta["wall_s"] = time.perf_counter() - t0
    paths = report.write_all(out, runs, rows, metrics, meta, plots=plots)
    return rows, meta, paths


def _tasks_info(cfgs: dict, runs: list, kept: dict) -> dict:
    """``meta["tasks"]``: each planned task's settings and description. A resumed run's
    tasks (``kept``, its results' ``meta.tasks``) stay, and its optimizers that this plan
    leaves out stay listed after the plan's: their runs are kept in the results."""
    tasks = {t: {**info, "config": dict(info["config"])} for t, info in kept.items()}
    for t, cfg in cfgs.items():
        config_ = cfg.to_dict()
        old = (tasks.get(t) or {}).get("config", {}).get("optimizers") or []
        config_["optimizers"] = list(config_["optimizers"]) + [o for o in old if o not in config_["optimizers"]]
        params = next((r.model_params for r in runs if r.task == t and r.model_params), None)
        tasks[t] = {"config": config_, "description": _describe(t, cfg, params)}
    return tasks


def _point_latest(out: Path, latest: Path = Path("runs/bench/latest")) -> None:
    """Point ``latest`` at ``out``: a symlink there is replaced; a real folder or file of
    that name is left alone, and the run says so (it had been deleted, folder and all)."""
    try:
        if latest.is_symlink():
            latest.unlink()
        elif latest.exists():
            core.say(f"flora-bench train: {latest} is a real {'folder' if latest.is_dir() else 'file'}, not a "
                     f"link; left alone (not pointed at {out})")
            return
        latest.symlink_to(out.resolve(), target_is_directory=True)
    except OSError:
        pass


def rewrite(sources: list[Path], out: Path | None) -> int:
    """``--from-json``: merge results files and rewrite every output from them."""
    from . import report

    meta, runs = report.merge(sources)
    tasks = [t for t in config.TASKS if t in meta.get("tasks", {})]
    meta["seeds"] = sorted({r.seed for r in runs})
    metrics = _metrics(tasks)
    rows = _ordered(report.choose(runs, metrics), tasks, lambda t: meta["tasks"][t]["config"]["optimizers"])
    report.mark_capped(rows, meta)
    paths = report.write_all(out or sources[0].parent, runs, rows, metrics, meta, plots=True)
    report.print_table(rows, metrics)
    core.say(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
