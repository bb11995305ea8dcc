"""Table of the phi_long runs (and the 4x floor, target and scaled r8 rows of ../long_x4):
per task and rank, each row at the lr with the best mean validation loss over 3 seeds,
test loss mean ± std, its ratio to the floor's, and the paired differences to 'scaled' (the
default until 2026-12-01) and to phi 0.4 ('fixed', the default since). Writes table.md beside this file."""
import collections, json, statistics as st
from pathlib import Path

here = Path(__file__).parent
runs = []
LONG = ("runs.jsonl", "runs_cnn.jsonl", "runs_newslm.jsonl", "runs_newslm32.jsonl")  # the longer runs
for f in [here / n for n in LONG] + [here.parent / "long_x4" / "runs.jsonl"]:
    for line in open(f):
        r = json.loads(line)
        if "row" not in r:  # a suite row
            o = r["optimizer"]
            if r.get("kappa") != 100:
                continue
            r["row"], r["rank"], r["scale"] = (o, None, 4.0) if o.startswith("adafactor") else ("scaled", 8, 4.0)
        runs.append(r)
by = collections.defaultdict(dict)  # (task, scale, rank, row) -> lr -> seed -> run
for r in runs:
    rank = None if r["row"].startswith("adafactor") else r["rank"]
    by[(r["task"], r["scale"], rank, r["row"])].setdefault(r["lr"], {})[r["seed"]] = r


def write(stem: str, lines: list[str], rows: list[dict]) -> None:
    """A Markdown table (``lines``) and its rows as CSV, as ``stem``.md and ``stem``.csv here."""
    import csv

    (here / f"{stem}.md").write_text("\n".join(lines) + "\n")
    with open(here / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n".join(lines))


def best(key):
    grid = {lr: s for lr, s in by[key].items() if len(s) == 3}
    if not grid:
        return None
    lr = min(grid, key=lambda x: st.mean(s["val_loss"] for s in grid[x].values()))
    lrs = sorted(by[key])  # every lr run, on one seed or three (a screen on seed 0 runs the neighbours once)
    edge = "low" if lr == lrs[0] else "high" if lr == lrs[-1] else ""
    return lr, grid[lr], edge


def main():
    lines = ["| task | scale | rank | row | lr | test loss | / floor | minus scaled (paired) | minus 0.4 (paired) | edge |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for task, scale in sorted({(k[0], k[1]) for k in by}):
        fl = best((task, scale, None, "adafactor"))
        for rank in [None] + sorted({k[2] for k in by if k[:2] == (task, scale) and k[2]}):
            for row in sorted({k[3] for k in by if k[:3] == (task, scale, rank)}):
                b = best((task, scale, rank, row))
                if not b:
                    continue
                lr, seeds, edge = b
                t = [seeds[s]["test_loss"] for s in sorted(seeds)]
                ratio = st.mean(t) / st.mean(fl[1][s]["test_loss"] for s in fl[1]) if fl else float("nan")
                d = []
                for other in ("scaled", "0.4"):
                    sc = best((task, scale, rank, other)) if rank else None
                    if sc and row != other:
                        diff = [seeds[s]["test_loss"] - sc[1][s]["test_loss"] for s in sorted(seeds)]
                        d.append(f"{st.mean(diff):+.4f} ± {st.stdev(diff):.4f}")
                    else:
                        d.append("")
                d = " | ".join(d)
                lines.append(f"| {task} | {scale:g} | {rank or ''} | {row} | {lr:g} | {st.mean(t):.4f} ± {st.stdev(t):.4f} "
                             f"| {ratio:.3f} | {d} | {edge} |")
    (here / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
