"""Plot bench_e2e.py results: time per sampling step for each variant, one panel per group.

    pytest benchmarks/bench_e2e.py --benchmark-only --benchmark-json=e2e.json
    python benchmarks/plot_e2e.py e2e.json --out e2e.png

Reads a pytest-benchmark JSON or a results JSON written by ``summarize.py`` (the GPU suite's,
``benchmarks/results/*.json``: its "cases"; ``--steps`` gives the steps per run where the cases
do not record them), keeps the groups starting with "e2e", and draws horizontal bars of the
median time per step in milliseconds, each labelled with its speedup over the group's "eager".
Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load_rows(path: str, steps: int | None = None) -> dict[str, list[tuple[str, float]]]:
    """{group: [(variant, ms per step), ...]} for the e2e groups of a benchmark JSON.

    ValueError (naming the file) for anything that is not one of the two formats."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not ("benchmarks" in data or "cases" in data):
        raise ValueError(f"{path}: neither a pytest-benchmark JSON nor a summarize.py results JSON")
    groups: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for b in data.get("benchmarks", []):
        group = b.get("group") or ""
        if not group.startswith("e2e"):
            continue
        info = b.get("extra_info", {})
        per_call = b["stats"]["median"] / info.get("inner", 1)
        n = info.get("steps") or steps or 1
        groups[group].append((info.get("variant", b["name"]), 1e3 * per_call / n))
    for c in data.get("cases", []):
        group = c.get("group") or ""
        if not group.startswith("e2e"):
            continue
        n = c.get("steps") or steps
        if n is None:
            raise ValueError(f"{path}: its cases do not record the steps per run; pass --steps")
        groups[group].append((c["variant"], c["time_us"] / 1e3 / n))
    return dict(groups)


def plot(groups: dict[str, list[tuple[str, float]]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(groups)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.2 + 0.5 * sum(map(len, groups.values()))))
    axes = [axes] if len(names) == 1 else list(axes)
    for ax, group in zip(axes, names, strict=True):
        rows = groups[group]
        eager = dict(rows).get("eager")
        labels = [v for v, _ in rows]
        ms = [t for _, t in rows]
        bars = ax.barh(labels, ms, color=["#999999" if v == "eager" else "#3a7bd5" for v in labels])
        for bar, t in zip(bars, ms, strict=True):
            note = f" {t:.3g} ms" + (f"  ({eager / t:.2f}x)" if eager else "")
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center")
        ax.invert_yaxis()
        ax.set_title(group, loc="left", fontsize=10)
        ax.set_xlim(0, max(ms) * 1.45)
        ax.set_xlabel("time per sampling step (ms, median)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", default="e2e.png", help="PNG to write")
    parser.add_argument("--steps", type=int, default=None, help="steps per run, if not recorded")
    args = parser.parse_args()
    try:
        groups = load_rows(args.json, args.steps)
    except ValueError as exc:
        parser.error(str(exc))
    if not groups:
        parser.error(f"{args.json}: no 'e2e' benchmark groups")
    plot(groups, args.out)
    for group, rows in sorted(groups.items()):
        print(group)
        for variant, ms in rows:
            print(f"  {variant:40s} {ms:9.3f} ms/step")


if __name__ == "__main__":
    main()
