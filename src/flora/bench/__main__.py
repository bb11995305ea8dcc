"""``flora-bench`` / ``python -m flora.bench``: every Flora measurement behind one entry point.

    flora-bench [train] [OPTIONS]        side-by-side training benchmark (the default)
    flora-bench step [OPTIONS]           one optimizer step on SmolLM2-135M's shapes: time, state
    flora-bench accum-memory [OPTIONS]   compressed gradient accumulation: peak memory, step
                                         time, fine-tune quality, gradient noise
    flora-bench comm [OPTIONS]           compressed communication across 2 replicas: bytes per
                                         step and loss, Flora's DDP hook against PowerSGD

``flora-bench SUBCOMMAND --help`` lists a subcommand's options. Every subcommand writes a
``results.json`` (with the run's metadata: commit, device, versions, date, command line)
and a ``results.md`` to its ``--out`` folder."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module (inside flora.bench) with HELP, add_arguments(parser), check(parser, args)
# and run(args, argv) -> exit code.
SUBCOMMANDS = {"train": "train", "step": "step", "accum-memory": "accum", "comm": "comm", "suite": "suite.cli"}
DEFAULT = "train"


def _module(name: str):
    return importlib.import_module(f"{__package__ or 'flora.bench'}.{SUBCOMMANDS[name]}")


def _top_help() -> str:
    lines = ["subcommands:"]
    for name in SUBCOMMANDS:
        lines.append(f"  {name:<14}{_module(name).HELP}")
    return "\n".join(lines + ["", __doc__.split("\n\n")[-1].strip()])


def parser_for(name: str) -> argparse.ArgumentParser:
    mod = _module(name)
    p = argparse.ArgumentParser(prog=f"flora-bench {name}", description=mod.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(p)
    return p


def _unusable_folder(path) -> str | None:
    """Why no folder can be made at, or written to, ``path``; None when one can. Nothing is
    left behind: the nearest part of the path that exists must be a folder this user may
    write, and a file must be writable there (the missing folders are made and removed)."""
    import os

    try:
        if path.exists() and not path.is_dir():
            return "is an existing file; give a folder (new or existing)"
        there = path
        while not there.exists() and there != there.parent:
            there = there.parent
        if not there.is_dir():
            return f"cannot be created: {str(there)!r} is a file, not a folder; give a folder that can be made"
        if not os.access(there, os.W_OK | os.X_OK):
            what = "is a folder" if there == path else f"would be made inside {str(there)!r}, a folder"
            return f"{what} that this user cannot write to; give a folder that can be written"
    except OSError as e:  # a part of the path that cannot even be looked at
        return f"cannot be used ({e.strerror or e}); give a folder that can be written"
    return _write_fails(path, there)


def _write_fails(path, there) -> str | None:
    """Why a file cannot be written in ``path`` (made, then removed again, up from the
    existing ``there``), or None. os.access says yes to root everywhere, also under /proc
    (a probe: a run started and failed at its first write)."""
    import tempfile

    made = []
    try:
        for part in reversed([path, *path.parents]):
            if part.is_relative_to(there) and part != there and not part.exists():
                part.mkdir()
                made.append(part)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return f"cannot be written ({e.strerror or e}); give a folder that can be written"
    finally:
        for part in reversed(made):
            try:
                part.rmdir()
            except OSError:
                pass
    return None


def _check_folders(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every subcommand's folder flags (results, the suite's data, the cache) must name a
    folder that exists or can be made, and that can be written: refused before any work, as
    a usage error (a run had ended in a traceback at its first write, after running). So
    must the folder that ``train --resume`` or ``--from-json`` writes into when no
    ``--out`` is given: its results file's (probe Z134: a resumed run finished, then failed
    on a read-only folder)."""
    from pathlib import Path

    for flag in ("out", "data", "cache"):
        value = getattr(args, flag, None)
        if flag == "data" and getattr(args, "report_only", False):  # not read by a report
            continue
        why = _unusable_folder(Path(value)) if isinstance(value, str) and value else None
        if why:
            p.error(f"--{flag}: {value!r} {why}")
    if not getattr(args, "out", None):
        for flag in ("resume", "from_json"):
            value = getattr(args, flag, None)
            if not (isinstance(value, str) and value):  # suite's --resume is a switch
                continue
            folder = Path(value.split(",")[0]).parent
            why = _unusable_folder(folder)
            if why:
                p.error(f"--{flag.replace('_', '-')}: the results are written beside {value.split(',')[0]!r} "
                        f"unless --out names another folder, and {str(folder)!r} {why}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = DEFAULT
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: flora-bench [{{{','.join(SUBCOMMANDS)}}}] [OPTIONS]\n\n{_top_help()}\n\n"
              f"options of {DEFAULT} (the default):")
        parser_for(DEFAULT).print_help()
        return 0
    if argv and not argv[0].startswith("-"):
        name = argv.pop(0)
        if name not in SUBCOMMANDS:
            print(f"usage: flora-bench [{{{','.join(SUBCOMMANDS)}}}] [OPTIONS]\n"
                  f"flora-bench: error: unknown subcommand {name!r}; valid subcommands: {', '.join(SUBCOMMANDS)} "
                  f"({DEFAULT} is the default)", file=sys.stderr)
            raise SystemExit(2)
    from . import core

    p = parser_for(name)
    args = p.parse_args(argv)
    _check_folders(p, args)
    _module(name).check(p, args)
    core.offline_env()
    stop = _stop_on_sigterm()
    import time

    started = time.time()
    try:
        with core.quiet():
            return _module(name).run(args, argv)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from whichever thread was waiting
        kept = {"train": "The runs that had finished are in the output folder (results.md says partial); the same "
                         "command with `--resume OUT/results.json` continues it.",
                "suite": "The runs that had finished are in the output folder; the same command with `--resume` "
                         "continues it.",
                "accum-memory": "The measurements that had finished are in the output folder's results.json and "
                                "results.md (marked partial).",
                "comm": "The runs that had finished are in the output folder's results.json and results.md (marked "
                        "partial)."}
        from pathlib import Path

        out = getattr(args, "out_resolved", None)
        results = None if out is None else Path(out) / "results.json"
        if name in ("train", "comm") and results is not None and not (results.exists()
                                                                   and results.stat().st_mtime >= started):
            # it named a folder not there, or an earlier run's results (probe Z105, review Z106)
            kept[name] = "No run had finished: nothing was written."
        print(f"\nflora-bench {name}: {stop['by']}. {kept.get(name, 'Nothing was written.')}", file=sys.stderr)
        return stop["code"]
    finally:
        stop["restore"]()


def _stop_on_sigterm() -> dict:
    """A SIGTERM (``kill``, a job scheduler's stop) ends a run as Ctrl-C does: the runs in
    flight are interrupted, what finished is kept, one line says how to resume (it had
    ended with a traceback of a broken pipe, and no such line: a probe). Exit code 143 for
    it, 130 for Ctrl-C."""
    import signal
    import threading

    stop = {"by": "interrupted", "code": 130, "restore": lambda: None}
    if threading.current_thread() is not threading.main_thread():  # (signal handlers: main thread only)
        return stop

    def on_term(signum, frame):
        from .runner import interrupt_runs

        stop.update(by="stopped by SIGTERM", code=143)
        interrupt_runs()
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    stop["restore"] = lambda: signal.signal(signal.SIGTERM, old)
    return stop


if __name__ == "__main__":
    sys.exit(main())
