"""Session 6 exploration (a learner's path): bugs found by using the public API by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff import NoiseSchedule
from fastdiff.samplers import DDIMSampler, DDPMSampler, DPMSolverPPSampler


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("method", ["predict_x0", "predict_eps"])
@pytest.mark.parametrize("t", [-1, 1000, 5.0])
def test_predict_checks_t(method, t):
    """A negative t silently read the table from the end; a float t was truncated."""
    s = NoiseSchedule()
    x, m = _x(2, 1, 4, 4), _x(2, 1, 4, 4, seed=1)
    with pytest.raises((ValueError, TypeError), match="t: expected"):
        getattr(s, method)(x, t, m)


@pytest.mark.parametrize("t", [torch.tensor([1, 2, 3]), torch.tensor([[1], [2]])])
def test_q_sample_t_shape(t):
    """t of the wrong length or rank: a broadcasting RuntimeError or a silent reshape."""
    s = NoiseSchedule()
    x0 = _x(2, 1, 4, 4)
    with pytest.raises(ValueError, match="t: expected"):
        s.q_sample(x0, t, torch.randn_like(x0))


def test_q_sample_integer_images():
    """uint8 images came back as all zeros (the tables were cast to uint8)."""
    s = NoiseSchedule()
    x0 = torch.full((2, 1, 4, 4), 200, dtype=torch.uint8)
    with pytest.raises(TypeError, match="x0: expected a floating-point"):
        s.q_sample(x0, 5, torch.randn(2, 1, 4, 4))


def test_num_train_timesteps_numpy_and_bool():
    assert NoiseSchedule(num_train_timesteps=np.int64(10)).num_train_timesteps == 10
    with pytest.raises(ValueError, match="num_train_timesteps: expected a positive int"):
        NoiseSchedule(num_train_timesteps=True)


# --------------------------------------------------------------------------- samplers
def test_ddim_thresholding_advances_philox_offset():
    """With thresholding the in-kernel noise reused one offset: the same z on every step."""
    smp = DDIMSampler(NoiseSchedule(), 10, eta=1.0, thresholding=True)
    x, m = _x(2, 1, 4, 4), _x(2, 1, 4, 4, seed=1)
    state = torch.tensor([123, 0])
    a = smp.step(m, 1, x, generator_state=state)
    assert state.tolist() == [123, x.numel()]
    b = smp.step(m, 1, x, generator_state=state)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("eta", [float("inf"), 3.0])
def test_ddim_eta_out_of_range(eta):
    """eta=inf gave inf coefficients; eta=3 clamped a negative variance to 0 silently."""
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(NoiseSchedule(), 10, eta=eta)


@pytest.mark.parametrize("cls", [DDIMSampler, DDPMSampler, DPMSolverPPSampler])
@pytest.mark.parametrize(
    "bad", [dict(dynamic_thresholding_ratio=0.0), dict(dynamic_thresholding_ratio=2.0),
            dict(sample_max_value=-1.0), dict(sample_max_value=float("nan"))],
)  # fmt: skip
def test_thresholding_options_checked(cls, bad):
    """sample_max_value=-1 flipped the sign of x0; ratio 2 failed deep in torch.quantile."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        cls(NoiseSchedule(), 10, thresholding=True, **bad)


# --------------------------------------------------------------------------- viz
def test_make_grid_uint8_and_single_image():
    """uint8 pixels came out all white (clamped as if in [-1, 1]); a [C x H x W] image failed."""
    from fastdiff.viz import make_grid

    u8 = torch.randint(0, 256, (3, 1, 4, 5), dtype=torch.uint8, generator=torch.Generator())
    im = make_grid(u8, nrow=3, scale=1, pad=0)
    assert np.array_equal(np.asarray(im), u8[:, 0].permute(1, 0, 2).reshape(4, 15).numpy())
    x = torch.rand(3, 4, 5) * 2 - 1
    assert make_grid(x, scale=1, pad=0).size == (5, 4)


@pytest.mark.parametrize(
    "kw", [dict(scale=0), dict(scale=-1), dict(pad=-1), dict(nrow=-2), dict(pad_value=300)]
)
def test_make_grid_checks_options(kw):
    from fastdiff.viz import make_grid

    with pytest.raises(ValueError, match=next(iter(kw))):
        make_grid(torch.rand(3, 1, 4, 4), **kw)


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(0, 1, 4, 4),
        torch.ones(2, 1, 4, 4, dtype=torch.bool),
        torch.ones(2, 1, 4, 4, dtype=torch.long),
    ],
)
def test_make_grid_rejects_empty_and_ambiguous(x):
    from fastdiff.viz import make_grid

    with pytest.raises((ValueError, TypeError), match="x: expected"):
        make_grid(x)


def test_save_png_tensor(tmp_path):
    """save_png(tensor) raised AttributeError 'Tensor' object has no attribute 'save'."""
    from PIL import Image

    from fastdiff.viz import make_grid, save_png

    x = torch.rand(4, 3, 4, 4) * 2 - 1
    save_png(x, tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").tobytes() == make_grid(x).tobytes()
    with pytest.raises(TypeError, match="image: expected"):
        save_png([1, 2], tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("x0, frames", [(torch.zeros(2, 1, 4, 4), 3), (torch.zeros(1, 4, 4), 0)])
def test_forward_strip_checks(x0, frames):
    from fastdiff.viz import forward_strip

    with pytest.raises(ValueError, match="x0|num_frames"):
        forward_strip(x0, NoiseSchedule(), num_frames=frames)


# --------------------------------------------------------------------------- model files
def test_load_model_file_bad_files(tmp_path):
    """A foreign .json beside the weights gave KeyError: 'config'; the .json itself or a
    non-safetensors file gave a bare SafetensorError."""
    from fastdiff.models.pretrained import load_model_file, weights_path

    st = tmp_path / "m.safetensors"
    st.write_bytes(weights_path("digits").read_bytes())
    (tmp_path / "m.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a fastdiff model config"):
        load_model_file(st)
    (tmp_path / "m.json").unlink()
    assert load_model_file(st).config.num_classes == 10  # the metadata copy of the config
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ValueError, match="expected the .safetensors weights file"):
        load_model_file(tmp_path / "c.json")
    bad = tmp_path / "bad.safetensors"
    bad.write_text("garbage")
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        load_model_file(bad)


# --------------------------------------------------------------------------- training
def _digits_like(n: int = 6):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1, (
        torch.arange(n) % 10
    )


def test_train_float64_data_and_numpy_steps():
    """float64 images failed in the first conv, numpy arrays in ``.to``; np.int64 steps were
    rejected."""
    import fastdiff

    x, y = _digits_like()
    ref = fastdiff.train(data=(x, y), steps=1, batch_size=2, progress=False)
    got = fastdiff.train(data=(x.double(), y), steps=np.int64(1), batch_size=2, progress=False)
    arrays = fastdiff.train(data=(x.double().numpy(), y.numpy()), steps=1, batch_size=2,
                            progress=False)  # fmt: skip
    for p, q, r in zip(ref.parameters(), got.parameters(), arrays.parameters(), strict=True):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(p, r)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(grad_clip=-1.0), "grad_clip"),
        (dict(warmup=-1), "warmup"),
        (dict(log_every=-1), "log_every"),
        (dict(stop_after=-2), "stop_after"),
        (dict(batch_size=True), "batch_size"),
        (dict(data=(torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.long))), "empty"),
        (dict(data=(torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.arange(4))), "floating"),
    ],
)
def test_train_rejects_bad_options(kw, match):
    """grad_clip=-1 made clip_grad_norm_ scale the gradients by a negative factor (ascent)."""
    import fastdiff

    kw = {"data": _digits_like(), "steps": 1, "batch_size": 2, "progress": False, **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        fastdiff.train(**kw)


# --------------------------------------------------------------------------- the command
@pytest.mark.parametrize(
    "args",
    [
        ["train", "--out", "{d}/m.safetensors", "--steps", "1", "--log-every", "-1"],
        ["show", "reverse", "--out", "{d}/r.png", "--label", "all", "--steps", "2"],
    ],
    ids=["log_every_neg", "reverse_label_all"],
)
def test_cli_more_bad_input(args, tmp_path, capsys):
    """--log-every -1 logged every step; show reverse --label all drew a 0 silently."""
    from fastdiff.cli import main

    rc = main([a.format(d=tmp_path) for a in args] + ["--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "error:" in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_broken_pipe_is_quiet(tmp_path):
    """`fastdiff info | head -1` printed 'fastdiff info: error: [Errno 32] Broken pipe'."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("fastdiff")
    cmd = [exe] if exe else [sys.executable, "-m", "fastdiff.cli"]
    p = subprocess.Popen(cmd + ["info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader goes away before the first line
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "error" not in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "args, match",
    [
        ((1000, 0), "steps"),
        ((1000, 2000), "steps"),  # leading spacing returned 2000 zeros
        ((1000, -3), "steps"),  # an empty array
        ((1000, 10, "leading", -1), "steps_offset"),
    ],
)
def test_spaced_timesteps_checks(args, match):
    from fastdiff.samplers import spaced_timesteps

    with pytest.raises(ValueError, match=match):
        spaced_timesteps(*args)


# --------------------------------------------------------------------------- data
def test_split_checks():
    """test_fraction=-0.5 gave a 'test' set of 899 (negative slice); y shorter -> IndexError."""
    from fastdiff.data import split

    x, y = torch.randn(20, 1, 8, 8), torch.arange(20) % 10
    xtr, ytr, xte, yte = split(x, y, 0.25)
    assert (len(xtr), len(xte)) == (15, 5) and torch.equal(torch.sort(torch.cat([ytr, yte]))[0],
                                                          torch.sort(y)[0])  # fmt: skip
    for bad in (-0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="test_fraction"):
            split(x, y, bad)
    with pytest.raises(ValueError, match="y: expected 20"):
        split(x, y[:10])


def test_schedule_bad_betas():
    """2-D betas were flattened silently; zero-SNR rescaling of one timestep gave NaN betas."""
    with pytest.raises(ValueError, match="betas: expected a 1-D"):
        NoiseSchedule(betas=[[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        NoiseSchedule(num_train_timesteps=1, rescale_betas_zero_snr=True)


@pytest.mark.parametrize("cls", [DPMSolverPPSampler, "euler"])
def test_user_betas_reaching_one(cls):
    """betas ending in 1 (zero terminal SNR given as betas, which NoiseSchedule accepts):
    DPM-Solver++ raised ZeroDivisionError and Euler built NaN coefficients."""
    from fastdiff.samplers import EulerSampler

    cls = EulerSampler if cls == "euler" else cls
    b = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
    b[-1] = 1.0
    zs = NoiseSchedule(betas=b)
    smp = cls(zs, 10, prediction_type="v_prediction")
    assert np.isfinite(smp.coef64).all()
    x = _x(2, 1, 4, 4)
    for i in range(smp.steps):
        x = smp.step(torch.tanh(x), i, x)
    assert torch.isfinite(x).all()


def test_show_unet_does_not_allocate_weights(monkeypatch, capsys):
    """`fastdiff show unet --preset adm-256` built 554 M random weights (2.5 GB, 12 s)."""
    from fastdiff.cli import main
    from fastdiff.models import UNet

    devices = []
    orig = UNet.__init__

    def spy(self, *args, **kwargs):
        devices.append(torch.empty(0).device.type)  # the default device while it is built
        orig(self, *args, **kwargs)

    monkeypatch.setattr(UNet, "__init__", spy)
    assert main(["show", "unet", "--preset", "adm-256"]) == 0
    assert devices == ["meta"]
    assert "553,839,110" in capsys.readouterr().out


def test_train_backend_sdpa(tmp_path, capsys):
    """`fastdiff train --backend sdpa` failed (sdpa forced on group_norm_silu) while
    `fastdiff sample --backend sdpa` applies it to attention only."""
    from fastdiff.cli import main

    out = tmp_path / "m.safetensors"
    args = ["train", "--out", str(out), "--steps", "1", "--batch-size", "2", "--quiet"]
    assert main(args + ["--backend", "sdpa"]) == 0, capsys.readouterr().err
    assert out.is_file()


def test_reverse_figure_checks():
    """Three frames with two timestep labels were drawn with a short label row, silently."""
    from fastdiff.viz import reverse_figure

    xs = torch.rand(3, 1, 4, 4) * 2 - 1
    assert reverse_figure(xs, xs, [900, 500, 0]).size[0] > 0
    for x0s, ts in ((xs, [900, 500]), (xs[:2], [900, 500, 0])):
        with pytest.raises(ValueError, match="timesteps"):
            reverse_figure(xs, x0s, ts)


def test_help_shows_every_default():
    """The parser promised '--help shows every option's default', but argparse's formatter
    skipped every option without help text (train --steps/--lr/--seed, all of show reverse)."""
    import argparse

    from fastdiff.cli import build_parser

    def parsers(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from parsers(sub)

    for p in parsers(build_parser()):
        text = " ".join(p.format_help().split())
        for a in p._actions:
            if not a.option_strings or a.default is None or a.default is False:
                continue
            if a.default == argparse.SUPPRESS:
                continue
            assert a.help, (p.prog, a.option_strings)
            assert f"default: {a.default}" in text, (p.prog, a.option_strings)


def test_schedules_figure_keeps_the_matplotlib_backend(tmp_path):
    """schedules_figure called matplotlib.use('Agg'): a notebook's inline backend was replaced."""
    matplotlib = pytest.importorskip("matplotlib")
    from fastdiff.viz import schedules_figure

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        fig = schedules_figure({"linear": NoiseSchedule(), "cosine": NoiseSchedule("cosine")})
        assert matplotlib.get_backend() == "svg"
        fig.savefig(tmp_path / "s.png", format="png")
        assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        matplotlib.use(before)


@pytest.mark.parametrize("cls", [DDIMSampler, DDPMSampler, DPMSolverPPSampler])
@pytest.mark.parametrize(
    "g, exc", [(float("nan"), ValueError), ("2", TypeError), (True, TypeError)]
)
def test_thresholding_checks_guidance_scale(cls, g, exc):
    """With thresholding the CFG combine ran before the op's checks: NaN went through."""
    smp = cls(NoiseSchedule(), 10, thresholding=True)
    with pytest.raises(exc, match="guidance_scale"):
        smp.step(_x(4, 1, 2, 2), 0, _x(2, 1, 2, 2, seed=1), guidance_scale=g)


def test_cli_env_backend_error_has_one_prefix(tmp_path, capsys, monkeypatch):
    """FASTDIFF_BACKEND=triton on CPU: 'fastdiff sample: error: fastdiff: backend ...'."""
    from fastdiff import _dispatch
    from fastdiff.cli import main

    if _dispatch.backend_available("triton", torch.device("cpu"))[0]:
        pytest.skip("triton runs on CPU here (TRITON_INTERPRET=1)")
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    out = tmp_path / "s.png"
    rc = main(["sample", "--steps", "1", "--n", "1", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("fastdiff sample: error: backend 'triton'"), err
    assert not out.exists()


def test_model_file_named_json(tmp_path):
    """save_model_file('m.json') wrote the config over the weights and then failed with
    FileNotFoundError; train(out='m.json') found out only after the whole run."""
    import fastdiff
    from fastdiff.models import UNet
    from fastdiff.models.pretrained import save_model_file

    with pytest.raises(ValueError, match="own file name"):
        save_model_file(UNet.from_preset("tiny"), tmp_path / "m.json")
    with pytest.raises(ValueError, match="does not exist"):
        save_model_file(UNet.from_preset("tiny"), tmp_path / "no" / "m.safetensors")
    with pytest.raises(ValueError, match="own file name"):
        fastdiff.train(data=_digits_like(), steps=1, batch_size=2, progress=False,
                       out=tmp_path / "m.json")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ckpt", ["m", "m.safetensors", "m.json"])
def test_checkpoint_same_files_as_out(tmp_path, ckpt, capsys):
    """`fastdiff train --out m.safetensors --checkpoint m`: the output overwrote the checkpoint,
    and the rerun failed with a 150-key 'Missing key(s) in state_dict' line."""
    from fastdiff.cli import main

    args = ["train", "--out", str(tmp_path / "m.safetensors"), "--checkpoint",
            str(tmp_path / ckpt), "--steps", "1", "--batch-size", "2", "--quiet"]  # fmt: skip
    assert main(args) == 2
    assert "names the same files" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_resume_mismatch_leaves_the_model_alone(tmp_path):
    """The checkpoint's weights were loaded into the caller's model before the settings check
    raised: the error left the model overwritten."""
    import fastdiff
    from fastdiff.models import UNet

    kw = dict(data=_digits_like(), batch_size=2, progress=False, checkpoint=tmp_path / "ck")
    fastdiff.train(steps=1, **kw)
    torch.manual_seed(1)
    model = UNet.from_preset("digits")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="other settings"):
        fastdiff.train(model, steps=2, **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_make_grid_numpy_ints():
    from fastdiff.viz import make_grid

    x = torch.rand(4, 1, 4, 4) * 2 - 1
    assert make_grid(x, nrow=np.int64(2), scale=np.int64(1), pad=np.int64(0)).size == (8, 8)
