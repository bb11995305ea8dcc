"""``flora-bench accum-memory``: peak memory and step time of gradient accumulation on
SmolLM2-135M: plain, compressed (``flora.CompressedAccumulator``) and compressed + fused,
each configuration in its own process, side by side in one invocation. Optional: a short
BBC fine-tune comparing held-out loss (``--quality``) and the gradient noise of the two
estimators (``--noise``).

    flora-bench accum-memory [--out DIR] [--quality] [--noise]
    flora-bench accum-memory --size smoke --quality --noise     # a tiny Llama, seconds

Configurations (``--configs``): ``reference`` runs forward and backward but drops every
gradient in a hook and never steps (its peak is weights + activations, the floor for fused
mode); ``plain`` accumulates dense ``.grad``; ``rR`` compresses at rank R; ``rR-fused`` also
steps inside backward; ``dense-fused`` steps inside backward without compressing.

Memory: on the CPU the peak resident set (VmHWM, reset after a warm-up cycle, so model
loading and first-step allocations do not count; each process starts with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks leave the RSS); on CUDA
``torch.cuda.max_memory_allocated`` (reset likewise). Data: the train task's token
streams (``--size quick``: SmolLM2's tokens of the BBC articles; smoke: bytes), held-out
loss on the shared BBC validation and test splits. Writes ``results.json`` and
``results.md`` to ``--out``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from . import config, core
from .accum_parts import _attach, _cycle, _model, measured, memory_row

HELP = "compressed gradient accumulation: peak memory, step time, fine-tune quality, gradient noise"


@dataclass(frozen=True)
class AccumSize:
    task: str  # the train task whose model and token streams are used
    configs: str
    tau: int
    steps: int
    seq: int
    batch: int
    quality_ranks: str
    quality_steps: int
    eval_chunks: int
    noise_rank: int


SIZES = {
    "quick": AccumSize(task="finetune", configs="reference,plain,r8,r32,r256,r32-fused", tau=8, steps=2, seq=32,
                       batch=1, quality_ranks="32", quality_steps=8, eval_chunks=32, noise_rank=32),
    "smoke": AccumSize(task="pretrain", configs="reference,plain,r4,r4-fused", tau=4, steps=1, seq=16, batch=1,
                       quality_ranks="4", quality_steps=2, eval_chunks=4, noise_rank=4),
}
CONFIG_FORMS = ("reference", "plain", "rR", "rR-fused", "dense-fused")
_CONFIG = re.compile(r"^(?:reference|plain|dense-fused|r(?P<rank>\d+)(?P<fused>-fused)?)$")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def parse_config(name: str) -> tuple[str | int | None, bool]:
    """(rank, fused): rank is ``"reference"``, ``"plain"``, an int, or None (dense, fused)."""
    m = _CONFIG.match(name)
    if not m:
        raise ValueError(f"unknown configuration {name!r}; valid: {', '.join(CONFIG_FORMS)} (R a rank, e.g. r32)")
    if name in ("reference", "plain"):
        return name, False
    if name == "dense-fused":
        return None, True
    if int(m["rank"]) < 1:  # a rank of 0 would fail only inside its run
        raise ValueError(f"{name}: the rank must be at least 1; valid: {', '.join(CONFIG_FORMS)} (R a rank >= 1, "
                         "e.g. r32)")
    return int(m["rank"]), bool(m["fused"])


@dataclass(frozen=True)
class AccumJob:
    kind: str  # memory, quality or noise
    name: str
    task: str
    cfg: config.TaskConfig  # seq, batch, tau and eval_batches of the run
    cache_dir: str
    device: str
    threads: int
    steps: int
    optimizer: str = "adafactor"
    lr: float = 1e-5
    rank: str | int | None = "plain"
    fused: bool = False
    seed: int = 0
    noise_seeds: int = 3
    replicas: int = 1  # processes of a memory configuration (accum_replicas.py)
    wrap: str | None = None  # with replicas > 1: "ddp" or "fsdp2"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="quick", choices=list(SIZES),
                   help="quick: SmolLM2-135M (default); smoke: a tiny byte-level Llama (seconds; for tests)")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/accum-memory-<timestamp>)")
    p.add_argument("--configs", default=None, help=f"comma list of {', '.join(CONFIG_FORMS)} (R a rank; default: "
                                                   "the size's, quick: reference,plain,r8,r32,r256,r32-fused)")
    p.add_argument("--tau", type=int, default=None, help="micro-batches per cycle (quick: 8)")
    p.add_argument("--steps", type=int, default=None, help="measured cycles after one warm-up cycle (quick: 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (quick: 32)")
    p.add_argument("--batch", type=int, default=None, help="sequences per micro-batch (quick: 1)")
    p.add_argument("--optimizer", default="adafactor",
                   help="optimizer of the memory runs, a flora-bench name (default adafactor: a few MiB of state, so "
                        "the gradients are what the configurations differ in; or adamw, flora-r32, ...)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in each measurement's process (default 2, or fewer where this process may "
                        "use fewer cores)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, ...")
    p.add_argument("--cpu", action="store_true", help="the same as --device cpu")
    p.add_argument("--cache", default=None, help="cache folder of the converted SmolLM2 and its tokens "
                                                 "(default runs/bench/cache or $FLORA_BENCH_CACHE)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every configuration in this process (peaks then cover all runs so far)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory configurations")
    p.add_argument("--quality", action="store_true", help="also run the BBC fine-tune (dense vs --quality-ranks)")
    p.add_argument("--quality-ranks", default=None, help="comma list of ranks (quick: 32)")
    p.add_argument("--quality-steps", type=int, default=None, help="optimizer steps of the fine-tune (quick: 8)")
    p.add_argument("--quality-lrs", default="1e-4,3e-4", help="AdamW learning rates of the fine-tune")
    p.add_argument("--eval-chunks", type=int, default=None, help="held-out sequences scored per split (quick: 32)")
    p.add_argument("--noise", action="store_true", help="also measure the estimators' gradient noise")
    p.add_argument("--noise-rank", type=int, default=None, help="(quick: 32)")
    p.add_argument("--noise-seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicas", type=int, default=1,
                   help="run each memory configuration in this many processes (gloo on the CPU, one GPU each on CUDA), "
                        "the model wrapped as --wrap says; per-rank peaks are reported")
    p.add_argument("--wrap", default=None, help="with --replicas > 1: comma list of ddp, fsdp2 (default both)")


def check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    from . import optimizers as bo

    core.refuse_empty(p, a, "--quality-ranks", "--quality-lrs")
    size = SIZES[a.size]
    for k in ("configs", "tau", "steps", "seq", "batch", "quality_ranks", "quality_steps", "eval_chunks",
              "noise_rank"):
        if getattr(a, k) is None:
            setattr(a, k, getattr(size, k))
    core.check_at_least(p, a, 1, "--tau", "--steps", "--seq", "--batch", "--quality-steps", "--eval-chunks",
                        "--noise-rank", "--noise-seeds")
    a.configs = core.checked_list(p, "--configs", a.configs, parse_config)
    try:
        spec = bo.parse(a.optimizer)
    except ValueError as e:
        p.error(f"--optimizer: {e}")
    if spec.family not in ("adamw", "adafactor", "flora") or spec.accumulate_rank is not None:
        p.error(f"--optimizer: {a.optimizer!r} is not offered here; valid: adamw, adafactor, adafactor-b0.9, "
                "flora-rR, flora-rR-FORM[-PROJECTION], flora-dense")
    try:
        a.quality_ranks = [int(r) for r in str(a.quality_ranks).split(",") if r.strip()]
        a.quality_lrs = [float(x) for x in a.quality_lrs.split(",") if x.strip()]
    except ValueError:
        p.error("--quality-ranks takes integers, --quality-lrs numbers, comma-separated")
    if any(r < 1 for r in a.quality_ranks):  # a rank of 0 would fail only inside its run
        p.error(f"--quality-ranks takes ranks of at least 1, got {','.join(map(str, a.quality_ranks))}")
    if any(x <= 0 or math.isinf(x) for x in a.quality_lrs):  # failed inside each run (nan: as tests use)
        p.error(f"--quality-lrs takes finite numbers above 0, got {','.join(f'{x:g}' for x in a.quality_lrs)}")
    core.refuse_repeats(p, "--quality-ranks", a.quality_ranks)
    core.refuse_repeats(p, "--quality-lrs", [f"{x:g}" for x in a.quality_lrs])
    core.check_seed(p, a.seed)
    if a.cpu:
        if a.device not in ("auto", "cpu"):
            p.error(f"--cpu and --device {a.device} contradict each other; give one")
        a.device = "cpu"
    core.check_device(p, a.device)
    if a.threads is None:  # 2 threads on one allowed core spin against each other (a probe saw 2 on one)
        a.threads = min(2, core.usable_cores())
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if not (math.isfinite(a.lr) and a.lr > 0):
        p.error(f"--lr (the memory runs') must be a finite number above 0, got {a.lr}")
    if not a.configs and not a.no_memory:
        p.error("--configs names no configuration; give some, or --no-memory with --quality or --noise")
    if a.no_memory and not (a.quality or a.noise):
        p.error("--no-memory leaves nothing to run: add --quality or --noise")
    from .accum_replicas import check_wrap

    if a.replicas < 1:
        p.error("--replicas must be >= 1")
    if a.no_memory and a.replicas > 1:  # only the memory runs take it: ignored, and recorded (probe Z135)
        p.error("--replicas spreads the memory measurement over processes; --no-memory runs none: drop one of them")
    if a.wrap is not None and a.replicas == 1:
        p.error("--wrap wraps the model of --replicas N > 1 processes; with one process nothing is wrapped: "
                "add --replicas 2 (or more), or drop --wrap")
    a.wrap = core.checked_list(p, "--wrap", a.wrap or "ddp,fsdp2", check_wrap)
    if a.replicas > 1 and "fsdp2" in a.wrap and spec.family == "adafactor":
        p.error(f"--optimizer {a.optimizer}: HF Adafactor cannot step FSDP2's sharded (DTensor) parameters; with "
                "--wrap fsdp2 use flora-rR, flora-dense or adamw")


def plan(a: argparse.Namespace, device: str, cache: Path) -> list[AccumJob]:
    size = SIZES[a.size]
    base = config.SIZES[a.size][size.task]
    cfg = dataclasses.replace(base, seq=a.seq, batch=a.batch, tau=a.tau,
                              eval_batches=max(1, math.ceil(a.eval_chunks / a.batch)))
    common = dict(task=size.task, cfg=cfg, cache_dir=str(cache), device=device, threads=a.threads, seed=a.seed)
    jobs = []
    if not a.no_memory:
        for wrap in a.wrap if a.replicas > 1 else [None]:
            for c in a.configs:
                rank, fused = parse_config(c)
                jobs.append(AccumJob("memory", c if wrap is None else f"{wrap}:{c}", steps=a.steps,
                                     optimizer=a.optimizer, lr=a.lr, rank=rank, fused=fused, replicas=a.replicas,
                                     wrap=wrap, **common))
    if a.quality:
        for lr in a.quality_lrs:
            for rank in [None] + a.quality_ranks:
                name = f"q-{'dense' if rank is None else f'r{rank}'}@{lr:g}"
                jobs.append(AccumJob("quality", name, steps=a.quality_steps, optimizer="adamw", lr=lr, rank=rank,
                                     **common))
    if a.noise:
        jobs.append(AccumJob("noise", "noise", steps=1, rank=a.noise_rank, noise_seeds=a.noise_seeds, **common))
    return jobs


# ------------------------------------------------------------------ workers (each in its own process)


def run_job(job: AccumJob) -> dict:
    """One configuration, measured (never raises: a failure is recorded with why)."""
    import torch

    core.offline_env()
    t0 = time.perf_counter()
    out = {"kind": job.kind, "config": job.name, "status": "ok"}
    with core.quiet():
        try:
            torch.manual_seed(job.seed)
            torch.set_num_threads(job.threads)
            out.update({"memory": _memory, "quality": _quality, "noise": _noise}[job.kind](job))
        except Exception as e:  # noqa: BLE001
            out["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            out["traceback"] = traceback.format_exc()[-4000:]
    out["wall_s"] = time.perf_counter() - t0
    return out


def _memory(job: AccumJob) -> dict:
    if job.replicas > 1:
        from .accum_replicas import memory

        return memory(job)
    from . import optimizers as bo

    task, model = _model(job)
    device = next(model.parameters()).device
    opt = bo.make_optimizer(bo.parse(job.optimizer), model.parameters(), job.lr, kappa=1000, seed=job.seed)
    acc = _attach(model, opt, job.rank, job.fused, task.tau)
    stepping = not (job.fused or job.rank == "reference")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    held: list[int] = []
    run = lambda s: _cycle(task, model, opt, s, device, step_optimizer=stepping, held=held)  # noqa: E731
    return memory_row(job, task, opt, acc, weights, *measured(run, job.steps, device), device=str(device),
                      held=held)


def _quality(job: AccumJob) -> dict:
    """Fine-tune with AdamW at ``job.lr`` (dense, or fed by a compressed accumulator), then
    held-out loss on the validation and test splits."""
    import torch

    task, model = _model(job)
    device = next(model.parameters()).device
    before = task.evaluate(model, "val", device)["loss"]
    opt = torch.optim.AdamW(model.parameters(), lr=job.lr)
    if job.rank is not None:
        _attach(model, opt, job.rank, False, task.tau, seed=1)
    t0 = time.perf_counter()
    train = [_cycle(task, model, opt, s, device, step_optimizer=True) for s in range(job.steps)]
    train_s = time.perf_counter() - t0
    return {"rank": job.rank, "tau": task.tau, "steps": job.steps, "lr": job.lr, "seq": job.cfg.seq,
            "batch": job.cfg.batch, "eval_sequences": job.cfg.eval_batches * job.cfg.batch,
            "val_loss_start": before, "val_loss": task.evaluate(model, "val", device)["loss"],
            "test_loss": task.evaluate(model, "test", device)["loss"], "train_loss": train, "train_s": train_s}


def _noise(job: AccumJob) -> dict:
    """Relative error ||G_hat - G|| / ||G|| of one cycle's accumulated gradient over the
    compressed parameters, with the last micro-batch exact or compressed, for a few seeds,
    under each projection the accumulator offers (``exact_last`` and ``all_compressed`` are
    the default projection's; ``by_projection`` holds every one, paired by seed)."""
    import flora

    task, model = _model(job)
    device = next(model.parameters()).device
    _cycle(task, model, None, 0, device, step_optimizer=False)
    dense = {p: p.grad.clone() for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    out = {"rank": job.rank, "tau": task.tau, "seeds": job.noise_seeds, "by_projection": {}}
    for projection in flora.accumulation.ACCUMULATION_PROJECTIONS:
        errors = {}
        for exact_last in (True, False):
            errs = []
            for seed in range(job.noise_seeds):
                acc = _attach(model, None, job.rank, False, task.tau, seed=seed, exact_last=exact_last,
                              projection=projection)
                _cycle(task, model, None, 0, device, step_optimizer=False)
                comp = [params[row["name"]] for row in acc.plan() if row["compressed"]]
                num = sum((p.grad - dense[p]).float().square().sum() for p in comp)
                den = sum(dense[p].float().square().sum() for p in comp)
                errs.append(float((num / den).sqrt()))
                model.zero_grad(set_to_none=True)
                acc.remove()
            errors["exact_last" if exact_last else "all_compressed"] = errs
        out["by_projection"][projection] = errors
    default = flora.CompressedAccumulator.__init__.__kwdefaults__["projection"]
    out.update(out["by_projection"][default], projection=default)
    return out


# ------------------------------------------------------------------ report


def _line(r: dict, i: int, n: int) -> str:
    what = r["status"]
    if r["status"] == "ok" and r["kind"] == "memory":
        what += f", peak {r['peak_mib']:.0f} MiB, step {r['median_step_s']:.2f} s"
    elif r["status"] == "ok" and r["kind"] == "quality":
        what += f", val loss {r['val_loss_start']:.4f} -> {r['val_loss']:.4f}"
    return f"[{i}/{n}] {r['kind']} {r['config']}: {what} ({r['wall_s']:.1f} s)"


def _memory_table(mem: list[dict]) -> list[str]:
    """The memory rows of one wrapping (none, DDP or FSDP2), against its own plain and
    reference rows."""
    base = lambda c: next((r for r in mem if r["config"].rsplit(":", 1)[-1] == c), None)  # noqa: E731
    plain, refr = base("plain"), base("reference")
    unit = "peak allocated" if mem[0]["device"].startswith("cuda") else "peak RSS"
    ratio = lambda r, b, k: "-" if b is None else f"{r[k] / b[k]:.3f}"  # noqa: E731
    wrap = mem[0].get("wrap")
    where = "" if wrap is None else f", {mem[0]['replicas']} processes under {wrap.upper()}, per rank (the largest)"
    weights = "this rank's shard of the weights" if wrap == "fsdp2" else "Weights"
    lines = [f"## Memory and step time: tau={mem[0]['tau']}, {mem[0]['batch']} x {mem[0]['seq']} tokens, "
             f"optimizer {mem[0]['optimizer']}, {mem[0]['device']}{where}", "",
             f"{weights} {_mib(mem[0]['weights_mib'])} MiB. Baseline = memory after a warm-up cycle (weights, "
             "optimizer state, runtime); peak measured over the following cycles. `.grad at step`: the "
             "gradient bytes held after the last backward, counted from the tensors.", ""]
    head = ["config", f"{unit} MiB", "peak - baseline MiB", "peak / plain", "peak / reference",
            ".grad at step MiB", "median step s", "step / plain"] + (["collectives per cycle"] if wrap else [])
    rows = []
    for r in mem:
        row = [r["config"], _mib(r["peak_mib"]), _mib(r["peak_over_baseline_mib"]), ratio(r, plain, "peak_mib"),
               ratio(r, refr, "peak_mib"), _mib(r["grad_mib_at_step"]), f"{r['median_step_s']:.2f}",
               "-" if plain is None else f"{r['median_step_s'] / plain['median_step_s']:.2f}"]
        if wrap:
            row.append(", ".join(f"{k} {v}" for k, v in sorted(r["collectives_per_cycle"].items())) or "none")
        rows.append(row)
    return lines + core.markdown_table(head, rows, align="lrrrrrrr" + ("l" if wrap else "")) + [""]


def _mib(v: float) -> str:
    """MiB to the unit where that is precise enough, else to three figures: the smoke model's
    0.11 MiB of gradients had printed as 0, like fused mode's none."""
    return f"{v:.0f}" if abs(v) >= 100 or v == 0 else f"{v:.3g}" if abs(v) >= 1 else f"{v:.3f}"


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# Gradient accumulation ({m['model']})", "", f"`{m['command']}`", "", core.meta_line(m), ""]
    if m.get("partial"):  # written between measurements: what a kill leaves says so
        done = sum(len(results[k]) for k in ("memory", "quality", "noise"))
        lines += [f"**Partial:** {done} of {m['configurations']} configurations measured (the run was stopped, "
                  "or is still going).", ""]
    ok = lambda kind: [r for r in results[kind] if r["status"] == "ok"]  # noqa: E731
    for wrap in dict.fromkeys(r.get("wrap") for r in ok("memory")):
        lines += _memory_table([r for r in ok("memory") if r.get("wrap") == wrap])
    for kind in ("memory", "quality", "noise"):
        for r in results[kind]:
            if r["status"] != "ok":
                lines.append(f"- {r['config']}: {r['status']}")
    q = ok("quality")
    if q:
        lines += ["", f"## Quality: BBC fine-tune, AdamW, tau={q[0]['tau']}, {q[0]['steps']} steps of "
                  f"{q[0]['batch']} x {q[0]['seq']} tokens; held-out loss on {q[0]['eval_sequences']} sequences "
                  "of the validation and test splits", ""]
        rows = []
        for r in q:
            dense = next((d for d in q if d["rank"] is None and d["lr"] == r["lr"]), None)
            rel = f"{100 * (r['val_loss'] / dense['val_loss'] - 1):+.2f}%" if dense else "-"
            rows.append([r["config"], f"{r['lr']:g}", f"{r['val_loss_start']:.4f}", f"{r['val_loss']:.4f}",
                         f"{r['test_loss']:.4f}", rel])
        lines += core.markdown_table(["config", "lr", "val loss before", "val loss after", "test loss after",
                                      "val vs dense (same lr)"], rows, align="lrrrrr")
        lines.append("")
    for n in ok("noise"):
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        lines += ["", f"## Gradient noise: rank {n['rank']}, tau={n['tau']}, {n['seeds']} seeds", "",
                  "relative error ||G_hat - G|| / ||G|| over the compressed parameters, mean (per seed):", ""]
        rows = []
        for projection, errs in n.get("by_projection", {n.get("projection", "gaussian"): n}).items():
            rows.append([projection] + [f"{mean(errs[k]):.3f} ({', '.join(f'{e:.3f}' for e in errs[k])})"
                                        for k in ("exact_last", "all_compressed")])
        lines += core.markdown_table(["projection", "last micro-batch exact", "all compressed"], rows, align="lll")
        lines.append("")
    return "\n".join(lines) + "\n"


def _write(out: Path, results: dict) -> str:
    """results.json and results.md; returns the Markdown."""
    core.write_json(out / "results.json", results)
    md = markdown(results)
    (out / "results.md").write_text(md)
    return md


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from .runner import Runner, cache_dir_default
    from .tasks import make_task

    device = core.resolve_device(args.device)
    cache = Path(args.cache) if args.cache else cache_dir_default()
    out = Path(args.out) if args.out else core.default_out("accum-memory")
    jobs = plan(args, device, cache)
    size = SIZES[args.size]
    model = "SmolLM2-135M" if size.task == "finetune" else "a tiny byte-level Llama"
    core.say(f"flora-bench accum-memory: {model}, {len(jobs)} configurations, device={device}, out={out}")
    if jobs:
        make_task(size.task, jobs[0].cfg, cache, args.seed).prepare()
    # the runs' thread count (--threads, set in each run), not this process's; one configuration at a time
    meta = core.run_metadata("accum-memory", argv, device, threads=args.threads, workers=1)
    meta.update(size=args.size, model=model, task=size.task, tau=args.tau, seq=args.seq, batch=args.batch,
                seed=args.seed, threads=args.threads, isolated=not args.no_isolate, replicas=args.replicas)
    meta.update(configurations=len(jobs), partial=True)
    results: dict = {"meta": meta, "memory": [], "quality": [], "noise": []}
    # Written at once and after each measurement, both files alike: partial results survive a
    # kill, and a folder of an earlier run keeps none of its files beside these (a probe: an
    # interrupted run had left the earlier run's results.md beside its own results.json)
    _write(out, results)
    runner = Runner(isolate=not args.no_isolate, device=device, env=MALLOC_ENV)
    for i, job in enumerate(jobs, 1):
        r = runner.run(run_job, job, lambda code, job=job: {
            "kind": job.kind, "config": job.name, "wall_s": 0.0,
            "status": f"failed: process exited with code {code} (out of memory?)"})
        results[job.kind].append(r)
        core.say(_line(r, i, len(jobs)))
        if i < len(jobs):
            _write(out, results)
    del meta["partial"]
    md = _write(out, results)
    print(md)
    core.say(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return core.failed_exit("flora-bench accum-memory", [r for kind in ("memory", "quality", "noise")
                                                         for r in results[kind]])
