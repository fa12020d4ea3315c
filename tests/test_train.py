"""fastdiff.train: Algorithm 1's sampling of t / noise / label dropout, EMA, outputs, resume."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fastdiff
from fastdiff.models import UNet
from fastdiff.models.pretrained import load_model_file, read_meta
from fastdiff.training import _lr_at, train


class Recorder(nn.Module):
    """A tiny eps-model that records the (t, class_labels) it is trained on."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.null_class = num_classes
        self.seen_t: list[torch.Tensor] = []
        self.seen_y: list[torch.Tensor] = []

    def forward(self, x, t, class_labels=None):
        self.seen_t.append(t.clone())
        self.seen_y.append(class_labels.clone())
        return self.conv(x)


def _data(n: int = 40):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 16, 16, generator=g) * 2 - 1
    y = torch.arange(n) % 10
    return x, y


def _tiny_unet() -> UNet:
    torch.manual_seed(3)
    return UNet.from_preset("tiny", in_channels=1, out_channels=1, num_classes=10)


def test_t_uniform_and_label_dropout_rate():
    m = Recorder()
    train(m, steps=20, batch_size=64, label_dropout=0.25, data=_data(), progress=False)
    t = torch.cat(m.seen_t)
    y = torch.cat(m.seen_y)
    assert t.min() >= 0 and t.max() <= 999 and t.max() > 900 and t.min() < 100
    assert t.dtype == torch.int64
    frac = (y == m.null_class).double().mean().item()
    assert 0.2 < frac < 0.3, frac  # 1280 draws at p = 0.25
    assert set(y[y != m.null_class].tolist()) <= set(range(10))


def test_no_dropout_keeps_labels():
    m = Recorder()
    train(m, steps=3, batch_size=16, label_dropout=0.0, data=_data(), progress=False)
    assert not (torch.cat(m.seen_y) == m.null_class).any()


def test_train_writes_ema_model_with_schedule(tmp_path):
    model = _tiny_unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "m.safetensors"
    ema = train(
        model, steps=4, batch_size=4, warmup=1, data=_data(), out=out, progress=False,
        beta_schedule="cosine",
    )  # fmt: skip
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert isinstance(ema.schedule, fastdiff.NoiseSchedule)
    assert ema.schedule.beta_schedule == "cosine"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "training did not change the weights"
    # the EMA lags the trained weights
    w = "conv_in.weight"
    assert not torch.equal(ema.state_dict()[w], model.state_dict()[w])
    meta = read_meta(out)
    assert meta["schedule"]["beta_schedule"] == "cosine"
    assert meta["training"]["steps"] == 4 and meta["training"]["seed"] == 0
    loaded = load_model_file(out)
    assert loaded.schedule.beta_schedule == "cosine"
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([10, 500])
    y = torch.tensor([3, loaded.null_class])
    torch.testing.assert_close(loaded(x, t, class_labels=y), ema(x, t, class_labels=y))


def test_fp16_output_is_smaller_and_loads_as_fp32(tmp_path):
    out32, out16 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train(_tiny_unet(), steps=1, batch_size=2, data=_data(), out=out32, progress=False)
    train(
        _tiny_unet(), steps=1, batch_size=2, data=_data(), out=out16, progress=False,
        out_dtype=torch.float16,
    )  # fmt: skip
    assert out16.stat().st_size < 0.6 * out32.stat().st_size
    assert next(load_model_file(out16).parameters()).dtype == torch.float32


def test_checkpoint_resume_is_bit_identical(tmp_path):
    kw = dict(steps=6, batch_size=4, warmup=2, data=_data(), progress=False, checkpoint_every=2)
    full = train(_tiny_unet(), checkpoint=tmp_path / "a" / "ck", **kw)
    ck = tmp_path / "b" / "ck"
    part = train(_tiny_unet(), checkpoint=ck, stop_after=3, **kw)
    meta = json.loads((tmp_path / "b" / "ck.json").read_text())
    assert meta["step"] == 3
    assert (tmp_path / "b" / "ck.safetensors").is_file()
    # a fresh (differently initialised) model picks up the checkpoint's weights
    torch.manual_seed(123)
    other = UNet.from_preset("tiny", in_channels=1, out_channels=1, num_classes=10)
    resumed = train(other, checkpoint=ck, **kw)
    sd_full, sd_res, sd_part = full.state_dict(), resumed.state_dict(), part.state_dict()
    for k in sd_full:
        assert torch.equal(sd_full[k], sd_res[k]), k
    assert any(not torch.equal(sd_full[k], sd_part[k]) for k in sd_full)
    # resume=False starts over
    again = train(_tiny_unet(), checkpoint=ck, resume=False, **kw)
    for k in sd_full:
        assert torch.equal(sd_full[k], again.state_dict()[k]), k


def test_resume_with_other_settings_is_an_error(tmp_path):
    kw = dict(steps=4, batch_size=4, warmup=2, data=_data(), progress=False, checkpoint_every=2)
    ck = tmp_path / "ck"
    train(_tiny_unet(), checkpoint=ck, stop_after=2, **kw)
    with pytest.raises(ValueError, match=r"batch_size=2 \(checkpoint: 4\)"):
        train(_tiny_unet(), checkpoint=ck, **{**kw, "batch_size": 2})
    with pytest.raises(ValueError, match="steps=1 "):
        train(_tiny_unet(), checkpoint=ck, **{**kw, "steps": 1})
    train(_tiny_unet(), checkpoint=ck, resume=False, **{**kw, "batch_size": 2})  # starts over


def test_global_rng_untouched_and_frozen_models_rejected():
    model, data = Recorder(), _data()
    torch.manual_seed(123)
    expect = torch.rand(3)
    torch.manual_seed(123)
    m = train(model, steps=2, batch_size=2, data=data, progress=False, seed=7)
    torch.testing.assert_close(torch.rand(3), expect, rtol=0, atol=0)  # the caller's stream
    with pytest.raises(ValueError, match="requires_grad_"):
        train(m.requires_grad_(False), steps=1, data=_data(), progress=False)


def test_lr_schedule():
    assert _lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert _lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert _lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert _lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)
    assert 0.1 < _lr_at(55, 1.0, 10, 100) < 1.0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(label_dropout=1.0), "label_dropout"),
        (dict(ema_decay=1.0), "ema_decay"),
        (dict(checkpoint_every=0), "checkpoint_every"),
        (dict(out="no/such/dir/m.safetensors"), "does not exist"),  # before any training step
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        train(Recorder(), data=_data(), progress=False, **{"steps": 1, **kw})


def test_unconditional_model_rejected():
    m = Recorder()
    m.null_class = None
    with pytest.raises(ValueError, match="class-conditional"):
        train(m, steps=1, data=_data(), progress=False)


def test_wrong_output_channels_rejected():
    torch.manual_seed(0)
    m = UNet.from_preset("tiny", in_channels=1, out_channels=2, num_classes=10)
    with pytest.raises(ValueError, match="model output"):
        train(m, steps=1, batch_size=2, data=_data(), progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        train(Recorder(), steps=1, data=_data(), progress=False, device="cuda")


@pytest.mark.cuda
def test_train_on_cuda(tmp_path):
    out = tmp_path / "m.safetensors"
    ema = train(_tiny_unet(), steps=3, batch_size=4, data=_data(), device="cuda", out=out,
                progress=False)  # fmt: skip
    assert next(ema.parameters()).is_cuda
    assert load_model_file(out).schedule is not None


def test_fastdiff_train_stays_the_function_after_importing_its_module():
    """The function lives in fastdiff.training: importing that module (as this file does) must
    not rebind fastdiff.train to a module (the CLI calls fastdiff.train(...))."""
    import fastdiff
    import fastdiff.training

    assert fastdiff.train is fastdiff.training.train and callable(fastdiff.train)
