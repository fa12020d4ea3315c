"""Turn a pytest-benchmark JSON into the GPU suite's results JSON and a short table.

    python benchmarks/summarize.py bench.json --junit tests.xml --out results.json

For every benchmark group the "eager" variant is the baseline; each variant gets its time, its
speed-up over eager measured in the same run, GB/s and % of the measured device-copy bandwidth
(the "copy" group), and TFLOP/s where the benchmark declared its flops.
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


def summarize(bench_json: str) -> list[dict]:
    data = json.loads(Path(bench_json).read_text())
    rows = []
    for b in data["benchmarks"]:
        ex = b.get("extra_info", {})
        inner = ex.get("inner", 1) or 1
        t = b["stats"]["median"] / inner
        rows.append(
            {
                "group": b.get("group") or b["name"],
                "variant": ex.get("variant", b["name"]),
                "test": b["name"],
                "time_us": t * 1e6,
                "bytes": ex.get("bytes", 0),
                "flops": ex.get("flops", 0),
            }
        )
    copy_bw = None
    for r in rows:
        if r["group"] == "copy" and r["bytes"]:
            copy_bw = r["bytes"] / (r["time_us"] * 1e-6) / 1e9
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    for _group, rs in by_group.items():
        eager = next((r for r in rs if r["variant"] == "eager"), None)
        for r in rs:
            if eager is not None:
                r["speedup_vs_eager"] = eager["time_us"] / r["time_us"]
            if r["bytes"]:
                r["GB/s"] = r["bytes"] / (r["time_us"] * 1e-6) / 1e9
                if copy_bw:
                    r["pct_of_copy_bw"] = 100.0 * r["GB/s"] / copy_bw
            if r["flops"]:
                r["TFLOP/s"] = r["flops"] / (r["time_us"] * 1e-6) / 1e12
    return rows


def table(rows: list[dict]) -> str:
    head = ("group", "variant", "time", "x eager", "GB/s", "%copy", "TFLOP/s")
    lines = ["{:<48} {:<34} {:>10} {:>8} {:>8} {:>6} {:>8}".format(*head)]
    for r in rows:
        lines.append(
            f"{r['group'][:48]:<48} {r['variant'][:34]:<34} {r['time_us']:>8.1f}us "
            f"{r.get('speedup_vs_eager', float('nan')):>8.2f} {r.get('GB/s', float('nan')):>8.1f} "
            f"{r.get('pct_of_copy_bw', float('nan')):>6.1f} {r.get('TFLOP/s', float('nan')):>8.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bench_json")
    ap.add_argument("--junit")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = summarize(args.bench_json)
    result = {"env": _env(), "tests": _junit(args.junit), "cases": rows}
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(table(rows))
    if result["tests"]:
        t = result["tests"]
        bad = t["failures"] + t["errors"]
        print(f"tests: {t['passed']} passed, {bad} failed, {t['skipped']} skipped")


if __name__ == "__main__":
    main()
