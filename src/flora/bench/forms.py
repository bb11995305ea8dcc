"""The momentum-form comparison (``flora-bench train --preset forms``, issue 9: which form
becomes Flora's default), written next to the main results wherever a task ran Flora at
two or more ranks (or in that preset): ``forms.md`` (per task, the test metric of every Flora form and
projection at every rank, and the best of every optimizer, as mean ± sample std over the
seeds), ``forms.csv``/``forms.json`` (one row per task and optimizer) and
``forms_<task>.png`` (the test metric against rank, log scale, error bars over the seeds;
Adafactor with and without momentum as horizontal lines with a band of one std)."""

from __future__ import annotations

from pathlib import Path

from . import core
from .core import MiB
from .rows import TASK_ORDER, Chosen, plus_minus, write_csv

BASELINES = {"adafactor": "Adafactor, beta1=None", "adafactor-b0.9": "Adafactor, beta1=0.9"}


def _spec(name: str):
    from . import optimizers as bo

    try:
        return bo.parse(name)
    except ValueError:
        return None


def form_label(spec) -> str:
    """A Flora row's form: FORM-PROJECTION, with the momentum dtype's suffix (``+bf16``,
    ``+fp32``) so that ``flora-r8``, ``flora-r8+bf16`` and ``flora-r8+fp32`` get rows of their
    own (one overwrote the other)."""
    from .optimizers import MOMENTUM_DTYPE_SUFFIXES

    dtype = {v: k for k, v in MOMENTUM_DTYPE_SUFFIXES.items()}.get(spec.momentum_dtype, spec.momentum_dtype)
    return spec.flora_form + (f"+{dtype}" if spec.momentum_dtype else "")


def test_key(metric: str) -> str:
    return "test_accuracy" if metric == "accuracy" else "test_loss"


def table(rows: list[Chosen], metrics: dict[str, str]) -> list[dict]:
    """One flat row per (task, optimizer) of the comparison: Flora without compressed
    accumulation (form, projection, rank) and the Adafactor baselines."""
    out = []
    for r in rows:
        spec = _spec(r.optimizer)
        flora = spec is not None and spec.family == "flora" and spec.rank and spec.accumulate_rank is None
        if not flora and r.optimizer not in BASELINES:
            continue
        metric = metrics[r.task]
        key = test_key(metric)
        out.append({
            "task": r.task, "optimizer": r.optimizer,
            "form": form_label(spec) if flora else r.optimizer,
            "rank": spec.rank if flora else None, "status": r.status, "lr": r.run.lr,
            "lrs_tried": sorted(x for x in r.lrs_tried if x == x), "lr_capped": r.lr_capped, "seeds": len(r.runs),
            "metric": key, "test_mean": r.get(key), "test_std": r.get(f"{key}_std"),
            "val_metric": f"val_{metric}", "val_mean": r.get(f"val_{metric}"), "val_std": r.get(f"val_{metric}_std"),
            "state_bytes": r.run.state_bytes,
        })
    return out


def tasks_compared(flat: list[dict], preset: str | None = None) -> list[str]:
    """The tasks where Flora ran at two or more ranks (with ``--preset forms``: at any)."""
    least = 1 if preset == "forms" else 2
    return [t for t in TASK_ORDER if len({d["rank"] for d in flat if d["task"] == t and d["rank"]}) >= least]


def _cell(d: dict) -> str:
    if d["status"] != "ok" or d["test_mean"] is None:
        return d["status"]
    return plus_minus(d["test_mean"], d["test_std"]) + ("*" if d["lr_capped"] else "")


def markdown(flat: list[dict], tasks: list[str], meta: dict, plots: bool = True) -> str:
    seeds = meta.get("seeds") or [meta.get("seed", 0)]
    lines = [f"# Flora momentum forms ({meta.get('size', '?')})", "",
             f"Command: `{meta.get('command', '?')}`", "",
             core.meta_line(meta), "",
             f"Each cell: the test metric at the lr with the best mean validation score, mean ± sample std over "
             f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}). Form = momentum form - projection "
             "(flora.Flora's momentum_form and projection). * = the best lr is still an end of its grid after the "
             "cap of grid extensions.", ""]
    for task in tasks:
        mine = [d for d in flat if d["task"] == task]
        metric = mine[0]["metric"].replace("_", " ")
        ranks = sorted({d["rank"] for d in mine if d["rank"]})
        forms = list(dict.fromkeys(d["form"] for d in mine if d["rank"]))
        better = "higher" if "accuracy" in metric else "lower"
        lines += [f"## {task}: {metric} ({better} is better)", ""]
        body = []
        for form in forms:
            cell = {d["rank"]: _cell(d) for d in mine if d["form"] == form}
            body.append([form] + [cell.get(r, "-") for r in ranks])
        for d in mine:
            if not d["rank"]:
                body.append([f"{d['optimizer']} ({BASELINES[d['optimizer']]})"] + [_cell(d)] * len(ranks))
        lines += core.markdown_table(["form"] + [f"r{r}" for r in ranks], body) + [""]
        if plots:  # a partial write draws none (review Z106)
            lines += [f"![{task}: {metric} against rank](forms_{task}.png)", ""]
        lines += ["Best of every optimizer:", ""]
        lines += core.markdown_table(
            ["optimizer", "lr (tried)", "seeds", f"val {mine[0]['val_metric'][4:]}", metric, "state MiB"],
            [[d["optimizer"], f"{d['lr']:g}{'*' if d['lr_capped'] else ''} ({', '.join(f'{x:g}' for x in d['lrs_tried'])})",
              d["seeds"], plus_minus(d["val_mean"], d["val_std"]) if d["val_mean"] is not None else "-", _cell(d),
              "-" if d["state_bytes"] is None else f"{d['state_bytes'] / MiB:.3g}"] for d in mine]) + [""]
    return "\n".join(lines)


def plot(path: Path, flat: list[dict], task: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [d for d in flat if d["task"] == task and d["status"] == "ok" and d["test_mean"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    forms = list(dict.fromkeys(d["form"] for d in mine if d["rank"]))
    for i, form in enumerate(forms):
        pts = sorted((d["rank"], d["test_mean"], d["test_std"] or 0.0) for d in mine if d["form"] == form)
        shift = 1 + 0.025 * (i - (len(forms) - 1) / 2)  # error bars side by side
        ax.errorbar([x * shift for x, _, _ in pts], [y for _, y, _ in pts], yerr=[s for _, _, s in pts],
                    marker="o", ms=3.5, lw=1.2, capsize=2.5, label=form)
    for d, style in zip([d for d in mine if not d["rank"]], ("--", ":")):
        line = ax.axhline(d["test_mean"], ls=style, lw=1.3, color="k" if style == "--" else "0.4",
                          label=BASELINES[d["optimizer"]])
        if d["test_std"]:
            ax.axhspan(d["test_mean"] - d["test_std"], d["test_mean"] + d["test_std"], color=line.get_color(),
                       alpha=0.12, lw=0)
    ranks = sorted({d["rank"] for d in mine if d["rank"]})
    ax.set_xscale("log")
    if ranks:
        ax.set_xticks(ranks)
        ax.set_xticklabels([str(r) for r in ranks])
        ax.minorticks_off()
    metric = (mine[0]["metric"] if mine else "test").replace("_", " ")
    seeds = max((d["seeds"] for d in mine), default=1)
    ax.set_title(f"{task}: {metric} against Flora's rank (mean ± std over {seeds} seed(s))", fontsize=9)
    ax.set_xlabel("rank (log scale)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write(out: Path, rows: list[Chosen], metrics: dict[str, str], meta: dict, *, plots: bool) -> dict[str, Path]:
    """The comparison's files in ``out`` (nothing where no task ran Flora at two ranks)."""
    flat = table(rows, metrics)
    tasks = tasks_compared(flat, meta.get("preset"))
    if not tasks:
        return {}
    flat = [d for d in flat if d["task"] in tasks]
    paths = {"forms_md": out / "forms.md", "forms_csv": out / "forms.csv", "forms_json": out / "forms.json"}
    paths["forms_md"].write_text(markdown(flat, tasks, meta, plots))
    write_csv(paths["forms_csv"], flat)
    core.write_json(paths["forms_json"], {"meta": meta, "forms": flat})
    if plots:
        for t in tasks:
            paths[f"forms_{t}"] = plot(out / f"forms_{t}.png", flat, t)
    return paths
