"""Turn a pytest-benchmark JSON into the GPU suite's results JSON and a short table.

    python benchmarks/summarize.py bench.json --junit tests.xml --out results.json

For every benchmark group the "eager" variant is the baseline; each variant gets its time, its
speed-up over eager measured in the same run, GB/s and % of the measured device-copy bandwidth
(the "copy" group), TFLOP/s where the benchmark declared its flops, and in attention groups the
fastest SDPA variant (default / flash / efficient / cuDNN) and each variant's ratio to it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import xml.etree.ElementTree as ET
from pathlib import Path


def _env() -> dict:
    import torch

    import fastdiff

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "build_info": fastdiff.build_info(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = p.name
        env["sm_count"] = p.multi_processor_count
        env["capability"] = f"{p.major}.{p.minor}"
    return env


def _junit(path: str | None) -> dict | None:
    if not path or not Path(path).exists():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for s in suites:
        for k in tot:
            tot[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    tot["failed_tests"] = failed
    return tot


def rows_from(benchmarks: list[dict]) -> list[dict]:
    """One row per benchmark (pytest-benchmark's JSON entries, or ``Metadata.as_dict()``), with
    the speed-up over its group's "eager" variant, GB/s, % of the "copy" group's bandwidth and
    TFLOP/s. Rows come back grouped (groups in order of first appearance, eager first)."""
    rows = []
    for b in benchmarks:
        stats = b.get("stats") or {}
        if not stats.get("median"):  # an errored or untimed (--benchmark-disable) case
            continue
        ex = b.get("extra_info") or {}
        inner = ex.get("inner", 1) or 1
        rows.append(
            {
                "group": b.get("group") or b["name"],
                "variant": ex.get("variant", b["name"]),
                "test": b["name"],
                "time_us": stats["median"] / inner * 1e6,
                "bytes": ex.get("bytes", 0),
                "flops": ex.get("flops", 0),
            }
        )
        if ex.get("steps"):  # bench_e2e: sampling steps per timed run
            rows[-1]["steps"] = ex["steps"]
    copy_bw = None
    for r in rows:
        if r["group"] == "copy" and r["bytes"]:
            copy_bw = r["bytes"] / (r["time_us"] * 1e-6) / 1e9
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    out = []
    for rs in by_group.values():
        rs.sort(key=lambda r: r["variant"] != "eager")  # stable: eager first, then as run
        eager = rs[0] if rs[0]["variant"] == "eager" else None
        for r in rs:
            if eager is not None:
                r["speedup_vs_eager"] = eager["time_us"] / r["time_us"]
            if r["bytes"]:
                r["GB/s"] = r["bytes"] / (r["time_us"] * 1e-6) / 1e9
                if copy_bw:
                    r["pct_of_copy_bw"] = 100.0 * r["GB/s"] / copy_bw
            if r["flops"]:
                r["TFLOP/s"] = r["flops"] / (r["time_us"] * 1e-6) / 1e12
        _vs_best_sdpa(rs)
        out += rs
    return out


def _vs_best_sdpa(rs: list[dict]) -> None:
    """In a group that timed PyTorch's SDPA ("sdpa", "sdpa-flash", ...): which SDPA variant was
    fastest, and every variant's speed-up over it (issue 5's bar: >= 1.0x the best SDPA)."""
    sdpa = [r for r in rs if r["variant"] == "sdpa" or r["variant"].startswith("sdpa-")]
    if not sdpa:
        return
    best = min(sdpa, key=lambda r: r["time_us"])
    for r in rs:
        r["best_sdpa"] = best["variant"]
        r["speedup_vs_best_sdpa"] = best["time_us"] / r["time_us"]


def load(bench_json: str) -> list[dict]:
    """The ``benchmarks`` list of a pytest-benchmark JSON file; ValueError on anything else."""
    path = Path(bench_json)
    if not path.is_file():
        raise ValueError(f"{bench_json}: no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{bench_json}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(
            f"{bench_json}: not a pytest-benchmark JSON (no 'benchmarks' list); "
            "write one with pytest benchmarks --benchmark-only --benchmark-json=FILE"
        )
    return data["benchmarks"]


def summarize(bench_json: str) -> list[dict]:
    """:func:`rows_from` on a pytest-benchmark JSON file."""
    return rows_from(load(bench_json))


def _time(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:.3g} s"
    if us >= 1e3:
        return f"{us / 1e3:.3g} ms"
    return f"{us:.3g} us"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict]) -> str:
    """Rows as a text table: median time per call, x eager (same run), x the group's best SDPA
    variant (marked ``*``), GB/s, % copy, TFLOP/s."""
    gw = max([len("group")] + [len(r["group"]) for r in rows])
    vw = max([len("variant")] + [len(r["variant"]) + 1 for r in rows])
    fmt = f"{{:<{gw}}}  {{:<{vw}}}  {{:>9}}  {{:>7}}  {{:>6}}  {{:>8}}  {{:>6}}  {{:>7}}"
    head = ("group", "variant", "median", "x eager", "x sdpa", "GB/s", "%copy", "TFLOP/s")
    lines = [fmt.format(*head)]
    prev = None
    for r in rows:
        best = "*" if r.get("best_sdpa") == r["variant"] else ""
        lines.append(
            fmt.format(
                r["group"] if r["group"] != prev else "",
                r["variant"] + best,
                _time(r["time_us"]),
                _num(r.get("speedup_vs_eager"), ".2f"),
                _num(r.get("speedup_vs_best_sdpa"), ".2f"),
                _num(r.get("GB/s"), ".3g"),
                _num(r.get("pct_of_copy_bw"), ".0f"),
                _num(r.get("TFLOP/s"), ".3g"),
            )
        )
        prev = r["group"]
    if any("best_sdpa" in r for r in rows):
        lines.append("x sdpa: speed-up over the fastest SDPA variant of the group (marked *)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("bench_json", help="pytest-benchmark JSON (--benchmark-json=FILE)")
    ap.add_argument("--junit", help="pytest --junitxml file of the test run, if any")
    ap.add_argument("--out", required=True, help="results JSON to write")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not out.parent.is_dir():
        ap.error(f"--out {args.out}: directory {out.parent} does not exist")
    try:
        rows = summarize(args.bench_json)
    except ValueError as exc:
        ap.error(str(exc))
    if not rows:
        ap.error(f"{args.bench_json}: no timed benchmark in it")
    try:
        tests = _junit(args.junit)
    except ET.ParseError as exc:
        print(f"summarize.py: warning: --junit {args.junit}: not readable XML ({exc})")
        tests = None
    result = {"env": _env(), "tests": tests, "cases": rows}
    out.write_text(json.dumps(result, indent=1, default=str))
    print(table(rows))
    if tests:
        bad = tests["failures"] + tests["errors"]
        print(f"tests: {tests['passed']} passed, {bad} failed, {tests['skipped']} skipped")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
