"""The ``fastdiff`` command: end to end on CPU, and every bad input is one line, no traceback,
non-zero exit and no output file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from helpers import record_sample_calls
from PIL import Image

import fastdiff
from fastdiff.cli import main
from fastdiff.models.pretrained import load_pretrained, weights_path

ROOT = Path(__file__).resolve().parents[1]
HAS_WEIGHTS = (Path(fastdiff.__file__).parent / "weights" / "digits.safetensors").is_file()
needs_weights = pytest.mark.skipif(not HAS_WEIGHTS, reason="digits weights not shipped yet")


def _grid_size(n: int, nrow: int, size: int = 16, scale: int = 4, pad: int = 2) -> tuple[int, int]:
    rows = -(-n // nrow)
    return nrow * size * scale + (nrow + 1) * pad, rows * size * scale + (rows + 1) * pad


def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("fastdiff")
    cmd = [exe] if exe else [sys.executable, "-m", "fastdiff.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd + args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def _assert_one_line_error(rc: int, err: str) -> None:
    assert rc != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0]
    assert "Traceback" not in err


# ----------------------------------------------------------------------- end to end
@needs_weights
def test_sample_console_script_end_to_end(tmp_path):
    out = tmp_path / "samples.png"
    r = _run_cli(["sample", "--steps", "2", "--n", "6", "--out", str(out), "--seed", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    im = Image.open(out)
    assert im.format == "PNG" and im.mode == "L"
    assert im.size == _grid_size(6, 3)  # ceil(sqrt(6)) = 3 per row
    px = torch.tensor(list(im.getdata()), dtype=torch.float32)
    assert px.std() > 10  # an image, not a blank


@needs_weights
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++", "euler", "heun"])
def test_sample_samplers_labels_guidance(tmp_path, capsys, sampler):
    out = tmp_path / "s.png"
    args = ["sample", "--steps", "2", "--n", "4", "--sampler", sampler, "--out", str(out),
            "--label", "3", "--guidance", "2.0", "--quiet"]  # fmt: skip
    assert main(args) == 0
    im = Image.open(out)
    assert im.mode == "L" and im.size == _grid_size(4, 2)


@needs_weights
@pytest.mark.parametrize(
    "flags,options",
    [
        (["--karras"], {"use_karras_sigmas": True}),
        (["--sde", "--karras"], {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
    ],
    ids=["karras", "sde-karras"],
)
def test_sample_flags_reach_the_dpm_sampler(flags, options, tmp_path, monkeypatch):
    """--karras / --sde reach the dpm++ sampler as its options (Karras grid, SDE variant); the
    images differ from a plain dpm++ run with the same seed."""
    seen = record_sample_calls(monkeypatch, run=True)
    outs = [tmp_path / "k.png", tmp_path / "l.png"]
    for out, extra in zip(outs, (flags, []), strict=True):
        assert main(["sample", "--steps", "4", "--n", "2", "--sampler", "dpm++", "--quiet",
                     "--out", str(out), *extra]) == 0  # fmt: skip
    assert {k: seen[0].get(k) for k in options} == options
    assert not set(options) & set(seen[1])
    assert outs[0].read_bytes() != outs[1].read_bytes()


@needs_weights
def test_sample_same_seed_same_png(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for p in (a, b):
        assert main(["sample", "--steps", "2", "--n", "3", "--out", str(p), "--quiet",
                     "--label", "all", "--backend", "torch"]) == 0  # fmt: skip
    assert a.read_bytes() == b.read_bytes()
    assert Image.open(a).size == _grid_size(3, 3)


def test_show_forward_and_unet(tmp_path, capsys):
    out = tmp_path / "forward.png"
    assert main(["show", "forward", "--out", str(out), "--frames", "5", "--digit", "7"]) == 0
    im = Image.open(out)
    assert im.mode == "L" and im.width == 5 * 64 + 6 * 2 and im.height > 64
    assert main(["show", "unet", "--preset", "digits"]) == 0
    table = capsys.readouterr().out
    assert "conv_in" in table and "total" in table


def test_show_schedules(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "schedules.png"
    assert main(["show", "schedules", "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"


def test_show_schedules_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "schedules.png"
    rc = main(["show", "schedules", "--out", str(out)])
    err = capsys.readouterr().err
    _assert_one_line_error(rc, err)
    assert "fastdiff[plot]" in err
    assert not out.exists()


@needs_weights
def test_show_reverse(tmp_path):
    out = tmp_path / "reverse.png"
    assert main(["show", "reverse", "--out", str(out), "--steps", "4", "--frames", "3",
                 "--quiet"]) == 0  # fmt: skip
    im = Image.open(out)
    assert im.mode == "L" and im.width == 3 * 64 + 4 * 2


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and "backends" in info and "cpu" in info["backends"]
    assert main(["info"]) == 0
    assert "backends[cpu]" in capsys.readouterr().out


def test_info_shows_the_backend_env_var(monkeypatch, capsys):
    monkeypatch.setenv("FASTDIFF_BACKEND", "numpy")
    assert main(["info"]) == 0
    assert "'numpy' is invalid: unknown fastdiff backend" in capsys.readouterr().out
    monkeypatch.setenv("FASTDIFF_BACKEND", "group_norm_silu=torch")
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["FASTDIFF_BACKEND"] == "group_norm_silu=torch"


def test_bench_json(capsys):
    assert main(["bench", "--json", "--ops-only", "--repeat", "1", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    ops = {r["op"] for r in res["rows"]}
    assert {"group_norm_silu", "attention", "dpm_solver_2m_step"} <= ops
    for r in res["rows"]:
        assert r["eager_ms"] > 0 and r["fused_ms"] > 0 and r["fused_backend"]


# ----------------------------------------------------------------------- bad input
BAD_SAMPLE = {
    "steps0": ["--steps", "0"],
    "steps_neg": ["--steps", "-3"],
    "steps_too_many": ["--steps", "5000"],
    "label_10": ["--label", "10"],
    "label_neg": ["--label", "-1"],
    "label_word": ["--label", "three"],
    "guidance_without_label": ["--guidance", "3"],
    "unknown_sampler": ["--sampler", "euler-magic"],
    "unknown_backend": ["--backend", "numpy"],
    "unavailable_backend": ["--backend", "cuda"],  # the cuda backend on CPU tensors
    "missing_model": ["--model", "does/not/exist.safetensors"],
    "bad_device": ["--device", "tpu"],
    "karras_without_dpm": ["--karras"],  # the default sampler is ddim
    "sde_without_dpm": ["--sde", "--sampler", "euler"],
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLE))
def test_sample_bad_input(case, tmp_path, capsys):
    needs_model = case in ("steps_too_many", "label_10", "label_neg", "guidance_without_label",
                           "karras_without_dpm", "sde_without_dpm")  # fmt: skip
    if needs_model and not HAS_WEIGHTS:
        pytest.skip("needs the shipped model")
    out = tmp_path / "samples.png"
    rc = main(["sample", "--steps", "2", "--n", "2", "--out", str(out), "--quiet"]
              + BAD_SAMPLE[case])  # fmt: skip
    _assert_one_line_error(rc, capsys.readouterr().err)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_train_writes_files_with_the_default_mode(tmp_path):
    """Like open(path, "w"): 0666 minus the umask (safetensors' temporary file is 0600)."""
    out = tmp_path / "m.safetensors"
    assert main(["train", "--steps", "1", "--out", str(out), "--quiet"]) == 0
    mask = os.umask(0)
    os.umask(mask)
    written = sorted(tmp_path.glob("m*.safetensors"))
    assert written
    for f in written:
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f.name


@pytest.mark.parametrize("where", ["no_dir", "is_dir"])
def test_unwritable_out(where, tmp_path, capsys):
    out = tmp_path / "missing" / "s.png" if where == "no_dir" else tmp_path
    for args in (
        ["sample", "--steps", "2", "--n", "2", "--out", str(out), "--quiet"],
        ["train", "--steps", "1", "--out", str(out), "--quiet"],
        ["show", "forward", "--out", str(out)],
        ["show", "schedules", "--out", str(out)],
        ["show", "reverse", "--steps", "2", "--out", str(out), "--quiet"],
    ):
        rc = main(args)
        _assert_one_line_error(rc, capsys.readouterr().err)
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("cmd", ["sample", "train", "reverse"])
def test_cuda_without_cuda(cmd, tmp_path, capsys):
    out = tmp_path / ("m.safetensors" if cmd == "train" else "s.png")
    args = {"sample": ["sample"], "train": ["train", "--steps", "1"],
            "reverse": ["show", "reverse"]}[cmd]  # fmt: skip
    rc = main(args + ["--device", "cuda", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    _assert_one_line_error(rc, err)
    assert "CUDA is not available" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--steps", "0", "--out", "{d}/m.safetensors"],
        ["train", "--out", "{d}/m.pt"],
        ["train", "--out", "{d}/m.safetensors", "--backend", "nope"],
        ["show", "unet", "--preset", "nope"],
        ["show", "forward", "--out", "{d}/f.png", "--digit", "12"],
        ["show", "forward", "--out", "{d}/f.jpg"],
        ["sample", "--out", "{d}/s.jpeg", "--steps", "2"],
        ["show", "forward", "--out", "{d}/f.png", "--schedule", "quadratic"],
        ["show", "reverse", "--out", "{d}/r.png", "--label", "11"],
        ["show", "reverse", "--out", "{d}/r.png", "--model", "{d}/nope.safetensors"],
        ["bench", "--device", "cuda:7" if torch.cuda.is_available() else "cuda"],
        ["frobnicate"],
        [],
    ],
    ids=lambda a: "-".join(a[:3]) or "empty",
)
def test_other_bad_input(args, tmp_path, capsys):
    if "--label" in args and not HAS_WEIGHTS:
        pytest.skip("needs the shipped model")
    rc = main([a.format(d=tmp_path) for a in args])
    _assert_one_line_error(rc, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["nan", "inf", "two"])
def test_show_reverse_guidance_is_checked_by_argparse(value, tmp_path, capsys):
    """show reverse --guidance is a finite number, refused by name (exit 2) before the model
    loads (it was a bare float: nan failed later, naming guidance_scale)."""
    rc = main(["show", "reverse", "--out", str(tmp_path / "r.png"), "--guidance", value,
               "--model", str(tmp_path / "missing.safetensors")])  # fmt: skip
    err = capsys.readouterr().err
    _assert_one_line_error(rc, err)
    assert rc == 2 and "argument --guidance" in err and "missing" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"not a safetensors file", b""])
def test_corrupt_model_file(content, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    out = tmp_path / "s.png"
    rc = main(["sample", "--model", str(bad), "--out", str(out), "--steps", "2", "--quiet"])
    _assert_one_line_error(rc, capsys.readouterr().err)
    assert not out.exists()


def test_bad_input_console_script_no_traceback(tmp_path):
    out = tmp_path / "s.png"
    r = _run_cli(["sample", "--model", "nope.safetensors", "--out", str(out)], tmp_path)
    _assert_one_line_error(r.returncode, r.stderr)
    assert "model file not found" in r.stderr
    assert not out.exists()


# ----------------------------------------------------------------------- package data
def test_weights_are_package_data():
    """pyproject's package-data patterns cover the shipped files, so a wheel (non-editable
    install) carries them; they are found through importlib.resources, not a source path."""
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["fastdiff"]
    for name in ("weights/digits.safetensors", "weights/digits.json"):
        assert any(fnmatch(name, p) for p in patterns), (name, patterns)


@needs_weights
def test_load_pretrained_from_package(tmp_path):
    path = weights_path("digits")
    assert path.parent.parent == Path(fastdiff.__file__).parent
    assert path.stat().st_size < 5 * 1024 * 1024
    model = load_pretrained("digits")
    assert isinstance(model.schedule, fastdiff.NoiseSchedule)
    assert model.config.num_classes == 10 and model.null_class == 10
    assert not model.training
    # found from anywhere, no source checkout on sys.path needed
    code = ("from fastdiff.models.pretrained import load_pretrained; "
            "m = load_pretrained('digits'); print(m.schedule.num_train_timesteps)")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1000"


@needs_weights
def test_weights_load_from_a_built_package(tmp_path):
    """Non-editable layout: setuptools copies the package with its package data (build_py, what
    a wheel holds apart from the compiled extension) into a fresh directory; that copy, not the
    checkout, finds and loads the model."""
    lib = tmp_path / "lib"
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (lib / "fastdiff" / "weights" / "digits.safetensors").is_file()
    code = ("import fastdiff; from fastdiff.models import load_pretrained; "
            "m = load_pretrained('digits'); print(fastdiff.__file__); "
            "print(m.schedule.num_train_timesteps)")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(lib), "PYTHONNOUSERSITE": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    where, T = r.stdout.split()
    assert Path(where).is_relative_to(lib) and T == "1000"


def test_no_pickle_in_loading():
    src = (ROOT / "fastdiff" / "models" / "pretrained.py").read_text()
    assert "torch.load" not in src and "pickle" not in src.replace("no pickle", "")


def test_unknown_pretrained():
    with pytest.raises(ValueError, match="unknown pretrained"):
        load_pretrained("cifar")
