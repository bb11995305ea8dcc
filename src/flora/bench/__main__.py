"""``python -m flora.bench`` / ``flora-bench``: train real models side by side with every
optimizer, pick each one's lr on a validation split, and write JSON, CSV, Markdown and PNG
results to a run folder."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from . import config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flora-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="quick", choices=list(config.SIZES),
                   help="quick (default, ~10 min on 2 CPU cores), full (every optimizer, 3-point lr sweep, "
                        "larger models), smoke (seconds; for tests)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated subset of pretrain,finetune,classify (default: all; smoke: pretrain)")
    p.add_argument("--optimizers", default=None,
                   help="comma-separated optimizer names for every selected task (default: the size's list); "
                        "e.g. adamw,adafactor-b0.9,flora-r32,flora-r32-paper,lora-r32,galore-r32,apollo-r32,"
                        "flora-opt-r32,adamw+ca-r32")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the size's)")
    p.add_argument("--lr-points", type=int, default=None, help="lr values swept per optimizer (1-3)")
    p.add_argument("--lrs", default=None,
                   help="explicit lrs instead of the sweep grid: KEY=LR[/LR...] entries, comma-separated, KEY an "
                        "optimizer name or an lr family (adam: AdamW/GaLore/APOLLO, adafactor: Adafactor/Flora/"
                        "flora-opt, lora), e.g. adam=1e-3,adafactor=1e-3/3e-3,lora=3e-3")
    p.add_argument("--tau", type=int, default=None, help="micro-batches per step in finetune (default: the size's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="run folder (default runs/bench/<timestamp>; runs/bench/latest "
                                               "points at the newest)")
    p.add_argument("--cache", default=None, help="cache folder for tokenized data and the converted SmolLM2 "
                                                 "(default runs/bench/cache or $FLORA_BENCH_CACHE)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per run (default: torch's choice, one per core)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every training in this process (peak RSS then covers all runs so far)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--from-json", default=None, metavar="RESULTS_JSON",
                   help="train nothing: re-read a results.json (e.g. of an interrupted run; several, comma-separated, "
                        "are merged) and rewrite table, CSV, Markdown and plots into --out (default: the first's "
                        "folder)")
    a = p.parse_args(argv)
    if a.steps is not None and a.steps < 1:
        p.error("--steps must be >= 1")
    if a.lr_points is not None and not 1 <= a.lr_points <= 3:
        p.error("--lr-points must be 1, 2 or 3")
    if a.lrs:
        try:
            a.lrs = {k.strip(): tuple(float(x) for x in v.split("/"))
                     for k, v in (e.split("=", 1) for e in a.lrs.split(",") if e.strip())}
        except ValueError:
            p.error("--lrs: expected KEY=LR[/LR...] entries, e.g. adam=1e-3,lora=3e-3/1e-2")
    if a.tau is not None and a.tau < 1:
        p.error("--tau must be >= 1")
    return a


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available to this torch ({torch.__version__})")
    return name


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores, {platform.machine()}), {torch.get_num_threads()} torch threads"


def _describe(task: str, cfg: dict, rec: dict | None) -> str:
    params = f"{rec['model_params'] / 1e6:.2f}M params" if rec and rec.get("model_params") else ""
    lr_note = f"lr: {cfg['lr_points']} value(s) per optimizer, picked on validation"
    if task == "pretrain":
        what = (f"Llama {cfg['layers']} layers x {cfg['hidden']} wide ({params}), byte-level, from scratch on "
                f"KJV + BBC text; {cfg['steps']} steps of {cfg['batch']} x {cfg['seq']} bytes")
    elif task == "finetune":
        what = (f"SmolLM2-135M ({params}) on BBC News text; {cfg['steps']} steps of tau={cfg['tau']} micro-batches "
                f"of {cfg['batch']} x {cfg['seq']} tokens")
    else:
        what = (f"all-MiniLM-L6-v2 ({params}) + 5-way head on BBC News topics; {cfg['steps']} steps of "
                f"{cfg['batch']} articles x {cfg['seq']} tokens; accuracy on {cfg['eval_examples']} held-out articles")
    return f"{what}; kappa (projection refresh, also GaLore/APOLLO update_proj_gap) = {cfg['kappa']}; {lr_note}."


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", message=".*kernels.*")
    import torch
    from tqdm.auto import tqdm

    import flora

    from . import optimizers as bo
    from . import report
    from .runner import Runner, cache_dir_default
    from .tasks import TASK_CLASSES, make_task

    if args.from_json:
        return _rewrite(Path(args.from_json), Path(args.out) if args.out else None)
    t0 = time.perf_counter()
    device = _device(args.device)
    default_tasks = ("pretrain",) if args.size == "smoke" else config.TASKS
    tasks = tuple(t.strip() for t in args.tasks.split(",")) if args.tasks else default_tasks
    for t in tasks:
        if t not in TASK_CLASSES:
            raise SystemExit(f"--tasks: unknown task {t!r} (choose from {', '.join(config.TASKS)})")
    opt_override = [o.strip() for o in args.optimizers.split(",") if o.strip()] if args.optimizers else None
    for o in opt_override or ():
        try:
            bo.parse(o)
        except ValueError as e:
            raise SystemExit(f"--optimizers: {e}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs/bench") / stamp
    cache = Path(args.cache) if args.cache else cache_dir_default()
    cfgs = {t: config.task_config(args.size, t, steps=args.steps, optimizers=opt_override,
                                  lr_points=args.lr_points, tau=args.tau) for t in tasks}
    peers = bo.peer_status()
    peer_of = {"galore": "galore_torch", "apollo": "apollo_torch", "flora-opt": "flora_opt"}

    jobs, skipped = [], []
    for t in tasks:
        cfg = cfgs[t]
        for name in cfg["optimizers"]:
            spec = bo.parse(name)
            why = None
            if spec.is_peer and peers[peer_of[spec.family]] != "ok":
                why = f"unavailable: {peer_of[spec.family]} not importable ({peers[peer_of[spec.family]]})"
            elif spec.accumulate_rank is not None and cfg.get("tau", 1) <= 1:
                why = "n/a: compressed accumulation needs tau > 1"
            elif spec.accumulate_rank is not None and not hasattr(flora, "CompressedAccumulator"):
                why = "unavailable: flora.CompressedAccumulator is not in this flora version"
            if why:
                skipped.append({"task": t, "optimizer": name, "lr": float("nan"), "status": why})
                continue
            lrs = bo.lr_grid(spec, t, cfg["lr_points"])
            if args.lrs:
                lrs = args.lrs.get(name, args.lrs.get(spec.lr_family, lrs))
            for lr in lrs:
                jobs.append({"task": t, "optimizer": name, "lr": lr, "cfg": cfg, "device": device,
                             "seed": args.seed, "cache_dir": str(cache),
                             "threads": args.threads or cfg.get("threads")})

    print(f"flora-bench: size={args.size} tasks={','.join(tasks)} device={device} runs={len(jobs)} out={out}",
          flush=True)
    for name, st in peers.items():
        if st != "ok":
            print(f"  peer {name}: {st}", flush=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = "python -m flora.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))

    def meta_base():
        return {"command": command.strip(), "size": args.size, "device": device,
                "device_name": _device_name(device), "torch": torch.__version__,
                "flora": getattr(flora, "__version__", "?"), "peers": peers, "started": started,
                "seed": args.seed, "runs_planned": len(jobs) + len(skipped)}

    runner = Runner(isolate=not args.no_isolate, device=device)
    runs = list(skipped)
    progress = not args.no_progress
    bar = tqdm(total=len(jobs), desc="flora-bench", position=0, disable=not progress, dynamic_ncols=True)
    prepared = set()
    for job in jobs:
        if job["task"] not in prepared:
            bar.set_description(f"preparing {job['task']}")
            make_task(job["task"], cfgs[job["task"]], cache, args.seed).prepare()
            prepared.add(job["task"])
        bar.set_description(f"{job['task']}:{job['optimizer']}@{job['lr']:g}")
        job = dict(job)
        if args.no_progress:
            job["progress"] = False
        rec = runner.run(job)
        if rec.get("status", "").startswith("failed") and rec.get("traceback"):
            tqdm.write(f"{job['task']}:{job['optimizer']}@{job['lr']:g} {rec['status']}")
        runs.append(rec)
        bar.update(1)
        _finish(out, runs, tasks, cfgs, meta_base(), t0, plots=False)  # partial results survive a kill
    bar.close()
    rows, meta, paths = _finish(out, runs, tasks, cfgs, meta_base(), t0, plots=True)
    if not args.out:
        latest = Path("runs/bench/latest")
        try:
            if latest.is_symlink() or latest.is_file():
                latest.unlink()
            elif latest.is_dir():
                shutil.rmtree(latest)
            latest.symlink_to(out.resolve(), target_is_directory=True)
        except OSError:
            pass
    report.print_table(rows, {t: TASK_CLASSES[t].metric for t in tasks})
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({meta['wall_s'] / 60:.1f} min)")
    return 0


def _finish(out, runs, tasks, cfgs, meta, t0, *, plots):
    from . import report
    from .tasks import TASK_CLASSES

    metrics = {t: TASK_CLASSES[t].metric for t in tasks}
    rows = report.choose(runs, metrics)
    order = {(t, o): i for i, (t, o) in enumerate((t, o) for t in tasks for o in cfgs[t]["optimizers"])}
    rows.sort(key=lambda r: order.get((r["task"], r["optimizer"]), 1 << 30))
    meta = dict(meta)
    meta["tasks"] = {t: {"config": dict(cfgs[t]),
                         "description": _describe(t, cfgs[t], next((r for r in runs if r["task"] == t
                                                                    and r.get("model_params")), None))}
                     for t in tasks}
    meta["runs_done"] = len(runs)
    meta["wall_s"] = time.perf_counter() - t0
    paths = report.write_all(out, runs, rows, metrics, meta, plots=plots)
    return rows, meta, paths


def _rewrite(src: Path, out: Path | None) -> int:
    import json

    from . import report
    from .tasks import TASK_CLASSES

    parts = [json.loads(Path(p).read_text()) for p in str(src).split(",")]
    meta, runs = parts[0]["meta"], [r for d in parts for r in d["runs"]]
    for d in parts[1:]:  # merged runs: union of the tasks' optimizer lists, every command
        meta["command"] += " && " + d["meta"]["command"]
        meta["wall_s"] = meta.get("wall_s", 0) + d["meta"].get("wall_s", 0)
        for t, info in d["meta"].get("tasks", {}).items():
            mine = meta.setdefault("tasks", {}).setdefault(t, info)
            opts = list(mine["config"]["optimizers"])
            mine["config"]["optimizers"] = opts + [o for o in info["config"]["optimizers"] if o not in opts]
    src = Path(str(src).split(",")[0])
    tasks = [t for t in config.TASKS if t in meta.get("tasks", {})]
    metrics = {t: TASK_CLASSES[t].metric for t in tasks}
    rows = report.choose(runs, metrics)
    order = {(t, o): i for i, (t, o) in enumerate((t, o) for t in tasks
                                                   for o in meta["tasks"][t]["config"]["optimizers"])}
    rows.sort(key=lambda r: order.get((r["task"], r["optimizer"]), 1 << 30))
    paths = report.write_all(out or src.parent, runs, rows, metrics, meta, plots=True)
    report.print_table(rows, metrics)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
