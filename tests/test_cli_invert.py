"""``fastdiff invert`` and ``fastdiff sample --noise``: the picture's x_T written as safetensors,
the forward sampler undoing it (the round trip gives a digit back), bad input one error line
writing nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import fastdiff
from fastdiff.cli import main
from fastdiff.data import load_digits


def _digit(tmp_path):
    """A digit of fastdiff.data as a 16 x 16 PNG, and its pixels in model space."""
    x, _ = load_digits()
    pix = ((x[7, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(pix).save(tmp_path / "digit.png")
    return str(tmp_path / "digit.png"), torch.from_numpy(pix).float() / 127.5 - 1.0


def _spy(monkeypatch, name):
    seen, real = [], getattr(fastdiff, name)

    def spy(*args, **kw):
        seen.append((args, kw, real(*args, **kw)))
        return seen[-1][-1]

    monkeypatch.setattr(fastdiff, name, spy)
    return seen


def _fake_sample(seen):
    """A stand-in for fastdiff.sample recording (steps, kwargs); returns x_T or zeros."""

    def fake(model, **kw):
        seen.append((kw["steps"], kw))
        x = kw["noise"]
        return torch.zeros(kw["batch_size"], 1, 16, 16) if x is None else x

    return fake


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys()), f.get_tensor("x_T"), f.metadata()


@pytest.mark.parametrize(
    "inverse,forward,bound",
    [("dpm++_inverse", "dpm++", (0.2, 0.03)), ("ddim_inverse", "ddim", (0.33, 0.06))],
)
def test_cli_invert_then_sample_noise_gives_the_digit_back(
    inverse, forward, bound, tmp_path, monkeypatch
):
    """invert writes fastdiff.invert's x_T (key x_T, metadata); sample --noise runs the matching
    forward sampler on it with the file's steps and batch, and returns the digit: at 20 steps
    max error 0.16 (dpm++) / 0.27 (ddim) in [-1, 1] (fastdiff.data's digit 7), mean 0.024 /
    0.048 (3 / 6 grey levels), where a sample from fresh noise is many times further off."""
    png, want = _digit(tmp_path)
    inv, smp = _spy(monkeypatch, "invert"), _spy(monkeypatch, "sample")
    noise = tmp_path / "x.safetensors"
    argv = ["invert", "--init-image", png, "--steps", "20", "--sampler", inverse, "--out",
            str(noise), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    keys, x_T, meta = _read(noise)
    (((_, image, steps), kw, got),) = inv
    assert keys == ["x_T"] and x_T.dtype == torch.float32 and x_T.shape == (1, 1, 16, 16)
    assert torch.equal(image[0, 0], want) and steps == 20 and kw["sampler"] == inverse
    assert kw["cond"] is None and kw["guidance_scale"] is None and kw["progress"] is False
    assert torch.equal(x_T, got) and not torch.equal(x_T, image)
    assert meta["sampler"] == inverse and meta["steps"] == "20"
    assert meta["sample_shape"] == "1x16x16" and meta["label"] == meta["guidance"] == ""
    assert json.loads(meta["options"]) == ({"clip_sample": False} if forward == "ddim" else {})
    out = tmp_path / "back.png"
    assert main(["sample", "--noise", str(noise), "--out", str(out), "--quiet"]) == 0
    (((model,), kw, x),) = smp[-1:]
    assert out.is_file() and kw["steps"] == 20 and kw["sampler"] == forward
    assert kw["batch_size"] == 1 and torch.equal(kw["noise"], x_T)
    assert kw.get("clip_sample", True) is (forward != "ddim")
    err = (x[0, 0] - want).abs()
    print(f"{inverse}: round trip max {err.max():.3f} mean {err.mean():.3f}")
    assert err.max() < bound[0] and err.mean() < bound[1]
    gen = torch.Generator().manual_seed(0)
    fresh = fastdiff.sample(
        model, 20, sampler=forward, noise=torch.randn(1, 1, 16, 16, generator=gen)
    )
    assert (fresh[0, 0] - want).abs().mean() > 4 * err.mean()


def test_cli_invert_label_and_the_files_settings(tmp_path, monkeypatch):
    """--label / --guidance reach invert (guidance 1 by default: none) and are stored;
    sample --noise takes --sampler / --steps / --n / --label / --guidance from the file unless
    given; the inverse's options only with the matching forward sampler."""
    png, _ = _digit(tmp_path)
    inv, smp = [], []
    monkeypatch.setattr(fastdiff, "invert", lambda m, i, s, **kw: inv.append(kw) or i * 0.5)
    monkeypatch.setattr(fastdiff, "sample", _fake_sample(smp))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    base = ["invert", "--init-image", png, "--steps", "7", "--quiet"]
    assert main([*base, "--label", "4", "--out", str(a)]) == 0
    assert inv[-1]["cond"].tolist() == [4] and inv[-1]["guidance_scale"] is None
    assert (_read(a)[2]["label"], _read(a)[2]["guidance"]) == ("4", "1.0")
    assert main([*base, "--label", "4", "--guidance", "3", "--out", str(b)]) == 0
    assert inv[-1]["guidance_scale"] == 3.0 and _read(b)[2]["guidance"] == "3.0"
    out = str(tmp_path / "o.png")
    assert main(["sample", "--noise", str(a), "--out", out, "--quiet"]) == 0
    steps, kw = smp[-1]
    assert (steps, kw["sampler"], kw["batch_size"], kw["cond"].tolist()) == (7, "ddim", 1, [4])
    assert kw["guidance_scale"] is None and kw["clip_sample"] is False
    assert main(["sample", "--noise", str(b), "--out", out, "--quiet"]) == 0
    assert smp[-1][1]["guidance_scale"] == 3.0 and smp[-1][1]["cond"].tolist() == [4]
    argv = ["sample", "--noise", str(b), "--sampler", "dpm++", "--steps", "5", "--label", "2",
            "--guidance", "1", "--n", "1", "--out", out, "--quiet"]  # fmt: skip
    assert main(argv) == 0
    steps, kw = smp[-1]
    assert (steps, kw["sampler"], kw["cond"].tolist()) == (5, "dpm++", [2])
    assert kw["guidance_scale"] is None and "clip_sample" not in kw
    # without --noise: the plain defaults, no noise
    assert main(["sample", "--out", out, "--quiet"]) == 0
    steps, kw = smp[-1]
    assert (steps, kw["sampler"], kw["batch_size"], kw["noise"]) == (50, "ddim", 64, None)


def test_cli_invert_karras_and_solver_order_round_trip(tmp_path, monkeypatch):
    """invert --sampler dpm++_inverse --karras --solver-order 3 runs fastdiff.invert with
    use_karras_sigmas / solver_order, stores them, and sample --noise runs dpm++ with them (the
    same grid and order both ways): the digit back at 20 steps within max 0.03, mean 0.007 on
    fastdiff.data's digit 7, where dpm++ without the Karras grid on that x_T lands further
    off; sample's own --solver-order wins over the file's."""
    png, want = _digit(tmp_path)
    inv, smp = _spy(monkeypatch, "invert"), _spy(monkeypatch, "sample")
    noise, out = tmp_path / "x.safetensors", str(tmp_path / "back.png")
    argv = ["invert", "--init-image", png, "--steps", "20", "--sampler", "dpm++_inverse",
            "--karras", "--solver-order", "3", "--out", str(noise), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    kw = inv[-1][1]
    assert kw["use_karras_sigmas"] is True and kw["solver_order"] == 3
    assert json.loads(_read(noise)[2]["options"]) == {"use_karras_sigmas": True, "solver_order": 3}
    assert main(["sample", "--noise", str(noise), "--out", out, "--quiet"]) == 0
    (model,), kw, x = smp[-1]
    assert kw["sampler"] == "dpm++" and kw["use_karras_sigmas"] is True
    assert kw["solver_order"] == 3
    err = (x[0, 0] - want).abs()
    print(f"karras order 3: round trip max {err.max():.3f} mean {err.mean():.3f}")
    assert err.max() < 0.08 and err.mean() < 0.015
    plain = fastdiff.sample(model, 20, sampler="dpm++", noise=kw["noise"], solver_order=3)
    assert (plain[0, 0] - want).abs().mean() > 2 * err.mean()
    argv = ["sample", "--noise", str(noise), "--solver-order", "2", "--out", out, "--quiet"]
    assert main(argv) == 0
    assert smp[-1][1]["solver_order"] == 2 and smp[-1][1]["use_karras_sigmas"] is True


@pytest.mark.parametrize(
    "argv,msg",
    [([], "--init-image"),  # argparse: required
     (["--init-image", "{png}", "--karras"], "--karras: for --sampler dpm++_inverse"),
     (["--init-image", "{png}", "--solver-order", "3"], "--solver-order: for --sampler dpm++_inve"),
     (["--init-image", "{png}", "--sampler", "dpm++_inverse", "--solver-order", "4"],
      "invalid choice: 4"),
     (["--init-image", "missing.png"], "--init-image: file not found"),
     (["--init-image", "{txt}"], "--init-image: cannot read"),
     (["--init-image", "{png}", "--guidance", "3"], "--guidance needs --label"),
     (["--init-image", "{png}", "--label", "all"], "--label all"),
     (["--init-image", "{png}", "--label", "12"], "--label must be in 0..9"),
     (["--init-image", "{png}", "--steps", "1001"], "--steps must be <= 1000"),
     (["--init-image", "{png}", "--steps", "0"], "positive integer"),
     (["--init-image", "{png}", "--sampler", "ddim"], "invalid choice"),
     (["--init-image", "{png}", "--device", "tpu"], "device"),
     (["--init-image", "{png}", "--model", "missing.safetensors"], "model file not found")],
)  # fmt: skip
def test_cli_invert_errors_write_nothing(argv, msg, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("not an image")
    Image.new("L", (16, 16)).save(tmp_path / "a.png")
    argv = [a.format(txt=tmp_path / "t.txt", png=tmp_path / "a.png") for a in argv]
    out = tmp_path / "x.safetensors"
    assert main(["invert", *argv, "--out", str(out), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert main(["invert", "--init-image", "a.png", "--out", str(tmp_path / "x.pt")]) != 0
    assert "must end in .safetensors" in capsys.readouterr().err


def _noise_files(tmp_path):
    z = torch.randn(2, 1, 16, 16)
    save_file({"x_T": z}, str(tmp_path / "ok.safetensors"), metadata={"sampler": "ddim_inverse"})
    save_file({"noise": z}, str(tmp_path / "key.safetensors"))
    save_file({"x_T": z.to(torch.int32)}, str(tmp_path / "int.safetensors"))
    save_file({"x_T": z[0]}, str(tmp_path / "rank.safetensors"))
    save_file({"x_T": torch.randn(2, 3, 16, 16)}, str(tmp_path / "chan.safetensors"))
    save_file({"x_T": torch.randn(2, 1, 8, 8)}, str(tmp_path / "size.safetensors"))
    save_file({"x_T": z.clone().index_fill_(3, torch.tensor([2]), float("nan"))},
              str(tmp_path / "nan.safetensors"))  # fmt: skip
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    Image.new("L", (16, 16)).save(tmp_path / "a.png")


@pytest.mark.parametrize(
    "argv,msg",
    [(["--noise", "missing.safetensors"], "--noise: file not found"),
     (["--noise", "{d}/junk.safetensors"], "cannot read"),
     (["--noise", "{d}/key.safetensors"], "has no tensor 'x_T'"),
     (["--noise", "{d}/int.safetensors"], "floating-point tensor"),
     (["--noise", "{d}/rank.safetensors"], "[N x C x H x W]"),
     (["--noise", "{d}/chan.safetensors"], "model samples [N x 1 x 16 x 16]"),
     (["--noise", "{d}/size.safetensors"], "shape (2, 1, 8, 8)"),
     (["--noise", "{d}/nan.safetensors"], "NaN or inf"),
     (["--noise", "{d}/ok.safetensors", "--init-image", "{d}/a.png"], "--noise and --init-image"),
     (["--noise", "{d}/ok.safetensors", "--n", "3"], "--n 3 does not match"),
     (["--noise", "{d}/ok.safetensors", "--strength", "0.5"], "--strength needs --init-image"),
     (["--noise", "{d}/ok.safetensors", "--steps", "1001"], "--steps must be <= 1000")],
)  # fmt: skip
def test_cli_sample_noise_errors_write_nothing(argv, msg, tmp_path, capsys, monkeypatch):
    _noise_files(tmp_path)
    monkeypatch.setattr(fastdiff, "sample", lambda *a, **k: pytest.fail("sampled"))
    argv = [a.format(d=tmp_path) for a in argv]
    out = tmp_path / "out.png"
    assert main(["sample", *argv, "--out", str(out), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_sample_noise_batch(tmp_path, monkeypatch):
    """A file of 2 x_T (written elsewhere, no metadata but the sampler): 2 images, ddim, 50."""
    _noise_files(tmp_path)
    seen = []
    monkeypatch.setattr(fastdiff, "sample", _fake_sample(seen))
    out = tmp_path / "out.png"
    assert main(["sample", "--noise", str(tmp_path / "ok.safetensors"), "--n", "2", "--out",
                 str(out), "--quiet"]) == 0  # fmt: skip
    ((steps, kw),) = seen
    assert (steps, kw["sampler"], kw["batch_size"], kw["noise"].shape) == (
        50,
        "ddim",
        2,
        (2, 1, 16, 16),
    )
    assert "clip_sample" not in kw and out.is_file() and np.asarray(Image.open(out)).size
