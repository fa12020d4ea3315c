"""Full quality numbers of the shipped digits model (README "Quality").

    python benchmarks/report_digits.py [--n 1000] [--device cuda] [--json out.json]
        [--model path.safetensors] [--samples docs/samples.png]

Class-conditional samples (labels 0..9 in turn) are read by a separate classifier
(benchmarks/digits_classifier.py) and the fraction recognised as the requested class is reported
for each sampler, step count and classifier-free guidance scale; unconditional samples are
counted per predicted class. Seeds are fixed, so the numbers repeat on the same device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_classifier  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.cli import sampler_options  # noqa: E402
from fastdiff.models.pretrained import load_model_file, load_pretrained  # noqa: E402

KARRAS = "dpm++ karras"  # DPM-Solver++ on the Karras sigma grid ("DPM++ 2M Karras")
SDE_KARRAS = "dpm++ sde karras"  # its SDE variant on the same grid ("DPM++ 2M SDE Karras")
CONFIGS = [  # (sampler, steps, guidance scale; None = plain conditional)
    ("ddim", 50, None),
    ("ddim", 50, 2.0),
    ("ddim", 50, 3.0),
    ("dpm++", 10, None),
    ("dpm++", 10, 2.0),
    ("dpm++", 10, 3.0),
    (KARRAS, 10, None),
    (KARRAS, 10, 2.0),
    ("euler_a", 30, None),
    ("euler_a", 30, 2.0),
    ("heun", 15, None),  # 29 model calls
    ("heun", 15, 2.0),
    (SDE_KARRAS, 20, None),
    (SDE_KARRAS, 20, 2.0),
    ("unipc", 10, None),
    ("unipc", 10, 2.0),
    ("ddpm", 100, None),
]
QUICK = [c for c in CONFIGS if c[0] in ("ddim", "dpm++") and c != ("ddim", 50, 3.0)]


def _sample(model, sampler, steps, n, guidance, cond=True, seed=0, device="cpu", bs=500):
    opts = sampler_options(sampler, guidance)
    if sampler == KARRAS:
        sampler, opts = "dpm++", {**opts, "use_karras_sigmas": True}
    elif sampler == SDE_KARRAS:
        sde = {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}
        sampler, opts = "dpm++", {**opts, **sde}
    outs = []
    for start in range(0, n, bs):
        m = min(bs, n - start)
        labels = (torch.arange(start, start + m) % 10).to(device) if cond else None
        g = torch.Generator(device=device).manual_seed(seed + start)
        with torch.no_grad():
            outs.append(
                fastdiff.sample(model, steps=steps, sampler=sampler, batch_size=m, cond=labels,
                                guidance_scale=guidance, generator=g, device=device,
                                **opts).cpu()
            )  # fmt: skip
    return torch.cat(outs)


def report(model, n: int, device: str, quick: bool = False) -> dict:
    clf = digits_classifier.fit()
    res: dict = {
        "n": n,
        "device": device,
        "classifier_held_out": digits_classifier.held_out_accuracy(),
    }
    rows = []
    labels = torch.arange(n) % 10
    for sampler, steps, gs in QUICK if quick else CONFIGS:
        t0 = time.perf_counter()
        x = _sample(model, sampler, steps, n, gs, device=device)
        dt = time.perf_counter() - t0
        pred = digits_classifier.predict(clf, x)
        per_class = [(pred[labels == c] == c).double().mean().item() for c in range(10)]
        rows.append(dict(sampler=sampler, steps=steps, guidance=gs,
                         accuracy=(pred == labels).double().mean().item(),
                         worst_class=min(range(10), key=lambda c: per_class[c]),
                         worst_class_accuracy=min(per_class), seconds=round(dt, 2)))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    res["conditional"] = rows
    x = _sample(model, "ddim", 50, n, None, cond=False, device=device)
    res["unconditional_ddim50_counts"] = (
        digits_classifier.predict(clf, x).bincount(minlength=10).tolist()
    )
    x = _sample(model, "dpm++", 10, n, None, cond=False, device=device)
    res["unconditional_dpm10_counts"] = (
        digits_classifier.predict(clf, x).bincount(minlength=10).tolist()
    )
    return res


def markdown(res: dict) -> str:
    lines = [
        f"Classifier (RBF SVM on the same 16x16 digits): {res['classifier_held_out']:.1%} on "
        "held-out real digits.",
        "",
        f"| sampler | steps | guidance | recognised as the requested class (n={res['n']}) "
        "| worst class |",
        "|---|---|---|---|---|",
    ]
    for r in res["conditional"]:
        g = "none" if r["guidance"] is None else f"{r['guidance']:g}"
        lines.append(f"| {r['sampler']} | {r['steps']} | {g} | {r['accuracy']:.1%} | "
                     f"{r['worst_class']}: {r['worst_class_accuracy']:.0%} |")  # fmt: skip
    lines.append("")
    for key, name in (("ddim50", "DDIM 50"), ("dpm10", "DPM-Solver++ 10")):
        if f"unconditional_{key}_counts" in res:
            lines.append(f"Unconditional samples, predicted class counts ({name}, n={res['n']}): "
                         f"{res[f'unconditional_{key}_counts']}")  # fmt: skip
    return "\n".join(lines)


def samples_png(model, path: str, device: str, guidance: float | None = None) -> None:
    """A 10x10 grid of class-conditional samples, column c = digit c (DDIM, 50 steps)."""
    from fastdiff.viz import make_grid, save_png

    labels = (torch.arange(100) % 10).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        x = fastdiff.sample(model, steps=50, batch_size=100, cond=labels, guidance_scale=guidance,
                            generator=g, device=device,
                            **sampler_options("ddim", guidance))  # fmt: skip
    save_png(make_grid(x, nrow=10, scale=3, pad=2), path)


def _count(s: str) -> int:
    try:
        value = int(s)
    except ValueError:
        value = 0
    if value < 10:
        raise argparse.ArgumentTypeError(f"expected an integer >= 10 (one per digit), got {s!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=_count, default=1000, help="samples per configuration (>= 10)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="a .safetensors written by `fastdiff train`")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--samples", default=None, help="also write the 10x10 sample grid here")
    p.add_argument("--quick", action="store_true", help="DDIM 50 and DPM-Solver++ 10 only")
    a = p.parse_args(argv)
    # checked before the (minutes-long) run, not when its results are written
    for flag, path in (("--json", a.json), ("--samples", a.samples)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            p.error(f"{flag} {path}: directory {Path(path).parent} does not exist")
    if a.model is not None and not Path(a.model).is_file():
        p.error(f"--model {a.model}: no such file")
    try:
        torch.empty(0, device=a.device)
    except (RuntimeError, AssertionError) as exc:
        p.error(f"--device {a.device}: {exc}")
    model = (
        load_pretrained("digits", device=a.device)
        if a.model is None
        else load_model_file(a.model, device=a.device)
    )
    res = report(model, a.n, a.device, quick=a.quick)
    res["training"] = getattr(model, "training_info", {})
    print(markdown(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    if a.samples:
        samples_png(model, a.samples, a.device, guidance=2.0)


if __name__ == "__main__":
    main()
