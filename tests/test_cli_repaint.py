"""``fastdiff repaint``: the picture, the mask and the RePaint options reach fastdiff.repaint;
bad input is one error line and writes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff.cli import main


def _pictures(tmp_path):
    pix = ((np.arange(16 * 16).reshape(16, 16) * 7) % 256).astype(np.uint8)
    Image.fromarray(pix).save(tmp_path / "in.png")
    m = np.zeros((32, 32), dtype=np.uint8)  # twice the model's size: resized
    m[8:24, 4:20] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    return str(tmp_path / "in.png"), str(tmp_path / "mask.png")


def test_cli_repaint_reaches_repaint_white_repaints(tmp_path, monkeypatch):
    """The picture (grayscale, / 127.5 - 1), the mask (resized, binarized, white = 1 =
    repaint), --steps / --jump-length / --jump-n-sample / --eta / --seed reach
    fastdiff.repaint; the grid keeps the picture where the mask is black."""
    img, msk = _pictures(tmp_path)
    seen, real = [], fastdiff.repaint

    def spy(model, image, mask, steps, **kw):
        seen.append((image, mask, steps, kw, real(model, image, mask, steps, **kw)))
        return seen[-1][-1]

    monkeypatch.setattr(fastdiff, "repaint", spy)
    out = tmp_path / "out.png"
    argv = ["repaint", "--init-image", img, "--mask", msk, "--steps", "6", "--jump-length", "2",
            "--jump-n-sample", "2", "--eta", "0.5", "--n", "2", "--seed", "3", "--out", str(out),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert out.is_file()
    ((image, mask, steps, kw, x),) = seen
    assert steps == 6 and (kw["jump_length"], kw["jump_n_sample"], kw["eta"]) == (2, 2, 0.5)
    assert kw["cond"] is None and kw["guidance_scale"] is None and kw["progress"] is False
    want = torch.zeros(16, 16)
    want[4:12, 2:10] = 1.0
    assert mask.shape == (2, 1, 16, 16) and torch.equal(mask[1, 0], want)
    pix = torch.from_numpy(((np.arange(256).reshape(16, 16) * 7) % 256).astype(np.float32))
    assert image.shape == (2, 1, 16, 16) and torch.equal(image[0, 0], pix / 127.5 - 1.0)
    keep = (mask == 0).expand_as(image)
    assert torch.equal(x[keep], image[keep]) and not torch.equal(x, image)
    # --seed: the same run again gives the same pixels; another seed others
    again = tmp_path / "again.png"
    assert main([*argv[:-3], "--out", str(again), "--quiet"]) == 0
    assert torch.equal(seen[-1][-1], x)
    assert main([*argv[:-5], "--seed", "4", "--out", str(again), "--quiet"]) == 0
    assert not torch.equal(seen[-1][-1], x)


def test_cli_repaint_label_and_guidance(tmp_path, monkeypatch):
    img, msk = _pictures(tmp_path)
    seen = []
    monkeypatch.setattr(fastdiff, "repaint", lambda m, i, k, s, **kw: seen.append(kw) or i)
    base = ["repaint", "--init-image", img, "--mask", msk, "--n", "3", "--quiet"]
    assert main([*base, "--label", "7", "--out", str(tmp_path / "a.png")]) == 0
    assert seen[-1]["cond"].tolist() == [7, 7, 7] and seen[-1]["guidance_scale"] == 2.0
    assert main([*base, "--label", "all", "--guidance", "1", "--out", str(tmp_path / "b.png")]) == 0
    assert seen[-1]["cond"].tolist() == [0, 1, 2] and seen[-1]["guidance_scale"] is None


@pytest.mark.parametrize(
    "argv,msg",
    [(["--mask", "{png}"], "--init-image"),  # argparse: required
     (["--init-image", "{png}"], "--mask"),
     (["--init-image", "{png}", "--mask", "missing.png"], "--mask: file not found"),
     (["--init-image", "missing.png", "--mask", "{png}"], "--init-image: file not found"),
     (["--init-image", "{png}", "--mask", "{txt}"], "--mask: cannot read"),
     (["--init-image", "{png}", "--mask", "{png}", "--eta", "1.5"], "--eta must be in [0, 1]"),
     (["--init-image", "{png}", "--mask", "{png}", "--eta", "nan"], "--eta must be in [0, 1]"),
     (["--init-image", "{png}", "--mask", "{png}", "--guidance", "3"], "--guidance needs --label"),
     (["--init-image", "{png}", "--mask", "{png}", "--label", "3", "--guidance", "nan"],
      "expected a finite number"),
     (["--init-image", "{png}", "--mask", "{png}", "--scale", "1000"], "makes a"),
     (["--init-image", "{png}", "--mask", "{png}", "--steps", "1001"], "steps"),
     (["--init-image", "{png}", "--mask", "{png}", "--jump-length", "0"], "positive integer"),
     (["--init-image", "{png}", "--mask", "{png}", "--label", "12"], "--label must be in 0..9"),
     (["--init-image", "{png}", "--mask", "{png}", "--device", "tpu"], "device")],
)  # fmt: skip
def test_cli_repaint_errors_write_nothing(argv, msg, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("not an image")
    Image.new("L", (16, 16)).save(tmp_path / "a.png")
    argv = [a.format(txt=tmp_path / "t.txt", png=tmp_path / "a.png") for a in argv]
    out = tmp_path / "out.png"
    assert main(["repaint", *argv, "--out", str(out), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1 and not out.exists()
