"""Markdown tables (and PNG plots) from benchmark result lines, for docs/benchmarks.md.

    python -m benchmarks._report RESULTS... [--plots docs/images]

RESULTS are JSON-lines files (a case's stdout) or the runner's ``results/*.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(paths: list[str]) -> list[dict]:
    lines = []
    for path in paths:
        text = Path(path).read_text()
        if text.lstrip().startswith("{\n") or '"results"' in text[:200]:
            lines.extend(json.loads(text)["results"])
        else:
            lines.extend(json.loads(x) for x in text.splitlines() if x.startswith("{"))
    return lines


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and value < 100:
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def table(lines: list[dict]) -> str:
    out = ["| name | value | unit | baseline | ratio | runs / note |", "|---|---:|---|---:|---:|---|"]
    for x in lines:
        p = x["params"]
        note = p.get("skipped") or p.get("baseline_is", "")
        if "runs" in p and not isinstance(p["runs"], list | dict):
            pass
        elif isinstance(p.get("runs"), list) and p["runs"] and not isinstance(p["runs"][0], dict):
            note = f"{note}; runs {p['runs']}"
        note = " ".join(str(note).split()).replace("|", "/")
        note = note if len(note) <= 160 else note[:157] + "..."
        ratio = "—" if x["ratio"] is None else f"**{x['ratio']:.2f}**"
        out.append(f"| `{x['name']}` | {fmt(x['value'])} | {x['unit']} | {fmt(x['baseline'])} | {ratio} | {note} |")
    return "\n".join(out)


def plot(lines: list[dict], prefix: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [x for x in lines if x["name"].startswith(prefix) and x["value"] is not None and "_vs_" not in x["name"]
            and "_s3_" not in x["name"]]  # the plots are of the local-folder runs
    if not rows:
        return
    labels = [x["name"].removeprefix(prefix) for x in rows]
    values = [x["value"] for x in rows]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    colors = ["tab:orange" if "trainflow" in lab else ("tab:gray" if lab in ("copy", "memory") else "tab:blue")
              for lab in labels]
    ax.barh(labels, values, color=colors)
    ax.invert_yaxis()
    ax.set_xlabel(rows[0]["unit"] + " (median)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("--plots")
    args = parser.parse_args()
    lines = load(args.results)
    print(table(lines))
    if args.plots:
        out = Path(args.plots)
        plot(lines, "loading_images_", "Loading one epoch of 20k image records (local, batch 64)", out / "bench-loading.png")
        plot(lines, "loading_interactions_", "Loading one epoch of 2M interactions (local, batch 1024)",
             out / "bench-loading-interactions.png")
        plot(lines, "sharding_write_images_", "Sharding 20k image records (local)", out / "bench-write-images.png")
        plot(lines, "sharding_write_interactions_", "Sharding 5M interactions (local)", out / "bench-write-interactions.png")


if __name__ == "__main__":
    main()
