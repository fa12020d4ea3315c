"""Session 20 mutation review of the modules session 19 did not cover: the CLI and its
subcommands (cli, _cli_args, _cli_repaint, _cli_invert, _cli_bench), fastdiff.repaint, img2img,
inversion, viz, data and training. One test per mutant the existing suite let survive, each
checked against an independent reference (a hand-computed value, a formula written out here, or
the function called directly); each test names the mutant it kills. Training and the planned
mutants of session 19 that were not run (nn, models.unet) are in test_review20b, those of
integrations in test_review20c."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff.cli import main


def _toy(x, t):
    """An elementwise eps-model (batches do not mix): ``0.3 tanh(x) + sin(t / 200)``."""
    return 0.3 * torch.tanh(x) + torch.sin(t.float() / 200)[:, None, None, None]


def _pictures(tmp_path):
    """A 16 x 16 grey picture and a 16 x 16 mask (white = repaint) in tmp_path: their paths."""
    pix = ((np.arange(16 * 16).reshape(16, 16) * 7) % 256).astype(np.uint8)
    Image.fromarray(pix).save(tmp_path / "in.png")
    m = np.zeros((16, 16), dtype=np.uint8)
    m[4:12, 2:10] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    return str(tmp_path / "in.png"), str(tmp_path / "mask.png")


def _spy_sample(monkeypatch) -> list[dict]:
    """fastdiff.sample replaced by a recorder of its keyword arguments returning zeros of the
    digits model's [batch x 1 x 16 x 16] (nothing sampled: only what reached sample())."""
    seen: list[dict] = []

    def spy(model, **kw):
        seen.append(kw)
        return torch.zeros(kw["batch_size"], 1, 16, 16)

    monkeypatch.setattr(fastdiff, "sample", spy)
    return seen


def _spy_repaint(monkeypatch) -> list[dict]:
    """fastdiff.repaint replaced by a recorder of its keyword arguments returning the image
    (nothing sampled: only what reached repaint())."""
    seen: list[dict] = []
    monkeypatch.setattr(fastdiff, "repaint", lambda m, i, k, s, **kw: seen.append(kw) or i)
    return seen


# ---------------------------------------------------------------------------------- cli / _cli_args
def test_cli_sample_eta_zero_is_accepted(tmp_path, monkeypatch):
    """--eta 0 (deterministic DDIM, TCD's gamma 0) is a valid value of "a finite number >= 0"
    and reaches sample() as eta=0.0. Mutant: _cli_args.py ``_finite_nonneg`` as 0 < v < inf."""
    seen = _spy_sample(monkeypatch)
    out = tmp_path / "s.png"
    assert main(["sample", "--steps", "2", "--n", "1", "--eta", "0", "--out", str(out)]) == 0
    assert seen[0]["eta"] == 0.0 and out.is_file()


def test_cli_seed_range_is_manual_seeds(tmp_path, monkeypatch, capsys):
    """--seed takes what torch.Generator.manual_seed takes, -2**63 .. 2**64 - 1: 2**64 - 1
    reaches sample() (as the generator's initial seed), 2**64 is argparse's one-line usage
    error (status 2) naming --seed, nothing written. Mutant: _cli_args.py ``v <= 2**64``."""
    seen = _spy_sample(monkeypatch)
    out = tmp_path / "s.png"
    base = ["sample", "--steps", "2", "--n", "1", "--out", str(out), "--seed"]
    assert main([*base, str(2**64 - 1)]) == 0
    assert seen[0]["generator"].initial_seed() == 2**64 - 1
    out.unlink()
    capsys.readouterr()
    assert main([*base, str(2**64)]) == 2
    err = capsys.readouterr().err
    assert "argument --seed: expected a seed in -2**63 .. 2**64-1" in err and not out.exists()


def test_cli_type_error_while_running_is_bad_input_status_2(tmp_path, monkeypatch, capsys):
    """A TypeError raised by the library for a user's value is bad input, as a ValueError:
    one error line, exit status 2 (1 is for failures while running). Mutant: cli.py mapping
    only CLIError / ValueError to 2."""

    def bad(model, **kw):
        raise TypeError("cond: expected class labels, got str")

    monkeypatch.setattr(fastdiff, "sample", bad)
    out = tmp_path / "s.png"
    assert main(["sample", "--steps", "2", "--n", "1", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == "fastdiff sample: error: cond: expected class labels, got str\n"
    assert not out.exists()


def test_cli_sample_guidance_zero_is_the_unconditional_scale(tmp_path, monkeypatch):
    """sample --label 3 --guidance 0 reaches sample() as guidance_scale 0.0 (not the default
    2: 0 is falsy). Mutant: cli.py ``g = a.guidance or DEFAULT_GUIDANCE``."""
    seen = _spy_sample(monkeypatch)
    argv = ["sample", "--steps", "2", "--n", "2", "--label", "3", "--guidance", "0"]
    assert main([*argv, "--out", str(tmp_path / "s.png")]) == 0
    assert seen[0]["guidance_scale"] == 0.0 and seen[0]["cond"].tolist() == [3, 3]


def test_cli_sample_noise_file_guidance_yields_to_the_given_one(tmp_path, monkeypatch):
    """sample --noise takes --label / --guidance from the file's metadata only where they are
    not given: --guidance 1.5 wins over the file's 3.0 (its label 3 still applies). Mutant:
    _cli_invert.py reading the file's guidance whenever it has one."""
    from fastdiff._cli_invert import _write_noise

    noise = tmp_path / "x.safetensors"
    meta = {"sampler": "ddim_inverse", "steps": "3", "label": "3", "guidance": "3.0",
            "options": '{"clip_sample": false}'}  # fmt: skip
    _write_noise(torch.zeros(2, 1, 16, 16), meta, noise)
    seen = _spy_sample(monkeypatch)
    out = str(tmp_path / "s.png")
    assert main(["sample", "--noise", str(noise), "--guidance", "1.5", "--out", out]) == 0
    assert seen[-1]["guidance_scale"] == 1.5 and seen[-1]["cond"].tolist() == [3, 3]
    assert main(["sample", "--noise", str(noise), "--out", out]) == 0
    assert seen[-1]["guidance_scale"] == 3.0 and seen[-1]["steps"] == 3


def test_cli_help_shows_no_default_for_flags():
    """--help appends "(default: X)" to options, but not for store_true flags (default False)
    or options without a default (None). Mutant: cli.py showing False defaults."""
    from fastdiff.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["sample"]
    text = sub.format_help()
    assert "(default: 50)" not in text and "default: 0" in text  # --seed's 0 is shown
    assert "default: False" not in text and "default: None" not in text


def test_cli_show_reverse_shows_at_most_one_frame_per_step(tmp_path, monkeypatch):
    """show reverse --frames 10 --steps 4 shows the 4 steps once each (K = min(frames,
    steps)), not 10 frames repeating steps. The figure's inputs recorded by a stand-in.
    Mutant: cli.py ``k = a.frames``."""
    import fastdiff.viz

    seen = []

    def figure(xs, x0s, ts):
        seen.append((xs.shape, ts))
        return Image.new("L", (4, 4))

    monkeypatch.setattr(fastdiff.viz, "reverse_figure", figure)
    out = tmp_path / "r.png"
    argv = ["show", "reverse", "--steps", "4", "--frames", "10", "--out", str(out), "--quiet"]
    assert main(argv) == 0 and out.is_file()
    ((shape, ts),) = seen
    assert shape[0] == 4 and len(ts) == 4 and len(set(ts)) == 4


def test_cli_sample_refuses_an_empty_noise_file_by_name(tmp_path, monkeypatch, capsys):
    """A --noise file whose x_T has no sample ([0 x 1 x 16 x 16]) is refused before anything
    runs: one line naming --noise and the non-empty batch it must be, exit status 2. Mutant:
    _cli_invert.py checking only x_T's rank."""
    from fastdiff._cli_invert import _write_noise

    noise = tmp_path / "x.safetensors"
    _write_noise(torch.zeros(0, 1, 16, 16), {"sampler": "ddim_inverse", "steps": "3"}, noise)
    seen = _spy_sample(monkeypatch)
    out = tmp_path / "s.png"
    assert main(["sample", "--noise", str(noise), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "x_T must be a non-empty [N x C x H x W] batch, got shape (0, 1, 16, 16)" in err
    assert seen == [] and not out.exists()


def test_cli_init_image_of_an_rgb_model_is_channels_first(tmp_path, monkeypatch):
    """--init-image for a 3-channel model: the RGB picture as [n x 3 x H x W], channel c at
    row y, column x being the picture's pixel (x, y) channel c / 127.5 - 1 (the grey digits
    model cannot show that layout). Mutant: cli.py ``x.permute(2, 1, 0)`` (rows and columns
    transposed)."""
    from fastdiff.models import UNet, UNetConfig
    from fastdiff.models.pretrained import save_model_file

    cfg = dict(in_channels=3, base_channels=8, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=(), num_groups=4, sample_size=8)  # fmt: skip
    path = tmp_path / "rgb.safetensors"
    save_model_file(UNet(UNetConfig(**cfg)), path, schedule="linear")
    pix = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 5 % 256).astype(np.uint8)
    Image.fromarray(pix, "RGB").save(tmp_path / "in.png")
    seen = _spy_sample(monkeypatch)
    argv = ["sample", "--model", str(path), "--init-image", str(tmp_path / "in.png"), "--n", "2",
            "--steps", "2", "--out", str(tmp_path / "o.png"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    want = torch.from_numpy(pix.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    image = seen[0]["image"]
    assert image.shape == (2, 3, 8, 8)
    torch.testing.assert_close(image[1], want, rtol=0, atol=0)


def test_cli_label_all_cycles_through_the_classes(tmp_path, monkeypatch):
    """--label all with --n 12 is the labels 0, 1, .., 9, 0, 1 (the digits model's 10
    classes, cycled), in a grid of 10 per row. Mutant: cli.py ``torch.arange(n)`` without
    ``% num_classes`` (labels 10 and 11: the null class and beyond)."""
    seen = _spy_sample(monkeypatch)
    out = tmp_path / "s.png"
    argv = ["sample", "--steps", "2", "--n", "12", "--label", "all", "--scale", "1"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    assert seen[0]["cond"].tolist() == [*range(10), 0, 1]
    assert Image.open(out).size == (10 * 16 + 11 * 2, 2 * 16 + 3 * 2)


def test_cli_show_forward_index_wraps_around_the_digits_examples(tmp_path):
    """show forward --index k picks example k of the digit, modulo their count: --index
    count + 2 draws the same picture as --index 2. Mutant: cli.py without the modulo (an
    IndexError, exit status 1)."""
    pytest.importorskip("sklearn")
    from fastdiff.data import load_digits

    _, y = load_digits()
    count = int((y == 3).sum())
    outs = [tmp_path / "a.png", tmp_path / "b.png"]
    for out, index in zip(outs, (2, count + 2), strict=True):
        argv = ["show", "forward", "--digit", "3", "--index", str(index), "--frames", "2"]
        assert main([*argv, "--out", str(out)]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()


# ------------------------------------------------------------------------------------- _cli_repaint
def test_cli_repaint_jump_length_and_jump_n_sample_are_not_swapped(tmp_path, monkeypatch):
    """--jump-length is the paper's j, --jump-n-sample its r: distinct values reach
    fastdiff.repaint under their own names (the other CLI test used 2 and 2, which cannot tell
    them apart). Mutant: _cli_repaint.py passing jump_length=a.jump_n_sample and vice versa."""
    img, msk = _pictures(tmp_path)
    seen = _spy_repaint(monkeypatch)
    argv = ["repaint", "--init-image", img, "--mask", msk, "--steps", "12", "--jump-length", "3",
            "--jump-n-sample", "5", "--n", "1", "--out", str(tmp_path / "o.png")]  # fmt: skip
    assert main(argv) == 0
    assert (seen[0]["jump_length"], seen[0]["jump_n_sample"]) == (3, 5)


def test_cli_repaint_guidance_zero_is_the_unconditional_scale(tmp_path, monkeypatch):
    """--label 3 --guidance 0 reaches fastdiff.repaint as guidance_scale 0.0 (eps = eps_u: the
    unconditional prediction), not as the default 2 (0 is falsy). Mutant: _cli_repaint.py
    ``g = a.guidance or DEFAULT_GUIDANCE``."""
    img, msk = _pictures(tmp_path)
    seen = _spy_repaint(monkeypatch)
    base = ["repaint", "--init-image", img, "--mask", msk, "--n", "2", "--label", "3"]
    assert main([*base, "--guidance", "0", "--out", str(tmp_path / "a.png")]) == 0
    assert seen[-1]["guidance_scale"] == 0.0 and seen[-1]["cond"].tolist() == [3, 3]


def test_cli_repaint_eta_one_is_accepted(tmp_path, monkeypatch):
    """--eta takes RePaint's DDIM eta in [0, 1], both ends included: 1 (DDPM's posterior
    variance, the paper's sampler) reaches fastdiff.repaint as eta=1.0. Mutant:
    _cli_repaint.py ``0 <= eta < 1``."""
    img, msk = _pictures(tmp_path)
    seen = _spy_repaint(monkeypatch)
    argv = ["repaint", "--init-image", img, "--mask", msk, "--n", "1", "--eta", "1"]
    assert main([*argv, "--out", str(tmp_path / "a.png")]) == 0 and seen[-1]["eta"] == 1.0


# --------------------------------------------------------------------------------------- _cli_bench
def test_bench_times_eager_under_the_torch_backend_and_fused_on_the_automatic_choice(
    monkeypatch, capsys
):
    """Per op the eager timing runs under use_backend("torch") and the fused one on the
    automatic choice (no backend requested): the backend requested while each timing runs,
    recorded by a stand-in timer. Mutant: _cli_bench.py timing eager outside
    ``use_backend("torch")`` (both columns the fused kernels: a speedup of ~1)."""
    import fastdiff._cli_bench as bench
    from fastdiff import _dispatch

    monkeypatch.delenv("FASTDIFF_BACKEND", raising=False)
    seen = []

    def timer(fn, dev, reps, warmup=2):
        seen.append(_dispatch.requested_backend("group_norm_silu"))
        return 1.0

    monkeypatch.setattr(bench, "_median_ms", timer)
    assert main(["bench", "--json", "--ops-only", "--device", "cpu", "--repeat", "1"]) == 0
    capsys.readouterr()
    assert len(seen) >= 8 and seen == ["torch", None] * (len(seen) // 2)


def test_bench_median_times_repeat_runs_after_the_warmup():
    """_median_ms calls the op ``warmup`` times untimed, then ``reps`` times timed (--repeat
    "timed runs per case (median)"): 2 + 5 calls. Mutant: _cli_bench.py timing one run."""
    from fastdiff._cli_bench import _median_ms

    calls = []
    assert _median_ms(lambda: calls.append(1), torch.device("cpu"), 5, warmup=2) >= 0
    assert len(calls) == 7


# ------------------------------------------------------------------------------------------ repaint
def test_repaint_guidance_zero_is_the_unconditional_model():
    """w = 0 in eps = eps_u + w (eps_c - eps_u) is the unconditional prediction: still one
    batched [uncond, cond] call per reverse step (a falsy 0.0 must not be read as "no
    guidance", which sent the model 2N rows against N timesteps). Reference: the same run of
    the model on uncond alone. Mutant: repaint.py ``rows = 2N if gs else N``."""
    g = torch.Generator().manual_seed(3)
    image = torch.randn(2, 1, 4, 4, generator=g).clamp(-1, 1)
    mask = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()
    cond, uncond = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)

    def model(x, t, encoder_hidden_states):
        assert t.shape == (x.shape[0],) and encoder_hidden_states.shape[0] == x.shape[0]
        return _toy(x, t) + 0.1 * encoder_hidden_states.mean(1).reshape(-1, 1, 1, 1)

    kw = dict(jump_length=2, jump_n_sample=2, eta=1.0)
    got = fastdiff.repaint(model, image, mask, 6, cond=cond, uncond=uncond, guidance_scale=0.0,
                           generator=torch.Generator().manual_seed(1), **kw)  # fmt: skip
    ref = fastdiff.repaint(lambda x, t: model(x, t, uncond), image, mask, 6,
                           generator=torch.Generator().manual_seed(1), **kw)  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_repaint_refuses_a_one_dimensional_image_by_name():
    """image must be a batch [N x C x ...]: a 1-D tensor is a ValueError naming image, before
    anything runs. Mutant: repaint.py checking only ``numel() == 0``."""
    with pytest.raises(ValueError, match=r"image: expected a non-empty batch \[N x C x ...\]"):
        fastdiff.repaint(_toy, torch.zeros(4), torch.zeros(4), 5)


def test_repaint_cuda_graph_on_cpu_is_refused_by_name():
    """cuda_graph=True for a run on the CPU is a ValueError naming cuda_graph (use False on
    CPU), before the model is called. Mutant: repaint.py without that check."""
    calls = []

    def model(x, t):
        calls.append(1)
        return _toy(x, t)

    image, mask = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    with pytest.raises(ValueError, match="cuda_graph: CUDA graphs need CUDA tensors"):
        fastdiff.repaint(model, image, mask, 4, jump_length=2, jump_n_sample=1, cuda_graph=True)
    assert calls == []


# ---------------------------------------------------------------------------------------- inversion
def test_invert_sampler_names_are_case_insensitive():
    """invert(sampler=) reads names as sample() does, case-insensitively: "DDIM_Inverse" is
    "ddim_inverse" (the same x_T). Mutant: inversion.py checking ``sampler`` not
    ``sampler.lower()`` against INVERSE_SAMPLERS (a ValueError for "DDIM_Inverse")."""
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    want = fastdiff.invert(_toy, x, 4, sampler="ddim_inverse")
    assert torch.equal(fastdiff.invert(_toy, x, 4, sampler="DDIM_Inverse"), want)
    want = fastdiff.invert(_toy, x, 4, sampler="dpm++_inverse")
    assert torch.equal(fastdiff.invert(_toy, x, 4, sampler="DPM++_Inverse"), want)


def test_invert_kdpm2_lms_config_without_class_name_runs_ddim_inversion():
    """A config dict without _class_name whose keys are several (forward) classes' at once
    (KDPM2DiscreteScheduler / its ancestral twin / LMSDiscreteScheduler share them) is no
    DPM-Solver++ inverse config, although its keys are all that class's parameters:
    invert(sampler=None) runs "ddim_inverse", the same x_T as naming it. Mutant: inversion.py
    without ``not classes_of_keys(cfg)`` (it ran "dpm++_inverse")."""
    diffusers = pytest.importorskip("diffusers")

    sch = diffusers.KDPM2DiscreteScheduler(timestep_spacing="leading")  # DDIM inversion's
    cfg = {k: v for k, v in dict(sch.config).items() if not k.startswith("_")}
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    want = fastdiff.invert(_toy, x, 4, schedule=cfg, sampler="ddim_inverse")
    torch.testing.assert_close(fastdiff.invert(_toy, x, 4, schedule=cfg), want, rtol=0, atol=0)


def test_invert_refuses_an_image_with_other_channels_than_the_model():
    """invert checks the image against the model's config before anything runs: a 1-channel
    image for a 3-channel UNet is a ValueError naming image and C = 3 (not a conv error after
    the first step). Mutant: inversion.py checking only the rank."""
    from test_review20b import _unet

    model = _unet()
    with pytest.raises(ValueError, match=r"image: expected a 4-D batch \[N x C x ...\] with C = 3"):
        fastdiff.invert(model, torch.zeros(2, 1, 8, 8), 3)


def test_invert_with_a_flow_match_scheduler_runs_flow_euler_inversion():
    """schedule=FlowMatchEulerDiscreteScheduler without sampler= inverts with
    "flow_euler_inverse" (the rectified-flow ODE): the same x_T as naming it. Mutant:
    inversion.py's _default_sampler answering "ddim_inverse" for that class."""
    diffusers = pytest.importorskip("diffusers")

    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    want = fastdiff.invert(_toy, x, 4, schedule=sch, sampler="flow_euler_inverse")
    torch.testing.assert_close(fastdiff.invert(_toy, x, 4, schedule=sch), want, rtol=0, atol=0)


def test_invert_refuses_a_config_of_no_class_it_would_not_read():
    """A config without _class_name whose keys are no class's and which "ddim_inverse" does not
    read (use_karras_sigmas, final_sigmas_type) is a ValueError naming schedule and the
    settings it would drop, as under sample(sampler=None); the model is not called. Mutant:
    inversion.py's _default_sampler without check_config_read."""
    calls = []

    def model(x, t):
        calls.append(1)
        return _toy(x, t)

    cfg = {"use_karras_sigmas": True, "final_sigmas_type": "zero"}
    with pytest.raises(ValueError, match=r"invert\(sampler=None\) runs 'ddim_inverse', which does "
                                         "not read use_karras_sigmas=True"):  # fmt: skip
        fastdiff.invert(model, torch.zeros(1, 1, 4, 4), 4, schedule=cfg)
    assert calls == []


def test_invert_float64_image_for_a_model_without_floating_parameters_names_image():
    """A model whose parameters are not floating (an int64 step counter) runs in the image's
    dtype, so a float64 image is refused as image (TypeError naming the supported dtypes),
    before anything runs. Mutant: inversion.py checking only models without parameters."""

    class IntParam(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor([3]), requires_grad=False)

        def forward(self, x, t):
            return _toy(x, t)

    with pytest.raises(TypeError, match="image: expected torch.float32, torch.float16 or "
                                        "torch.bfloat16 \\(a model without floating"):  # fmt: skip
        fastdiff.invert(IntParam(), torch.zeros(1, 1, 4, 4, dtype=torch.float64), 3)


def test_invert_unknown_options_with_a_sampler_object_are_named_as_unknown():
    """An option DDIMInverseSampler does not take (eta) beside a sampler object is a TypeError
    naming it as unknown, as with a sampler name (not sample()'s "cannot be applied to a
    sampler object; build the sampler with them", which no build could satisfy). Mutant:
    inversion.py without _check_options for sampler objects."""
    from fastdiff import NoiseSchedule
    from fastdiff.samplers import DDIMInverseSampler

    smp = DDIMInverseSampler(NoiseSchedule("linear"), 4)
    x = torch.zeros(1, 1, 4, 4)
    for sampler in (smp, "ddim_inverse"):
        with pytest.raises(TypeError, match=r"invert: unknown option\(s\) \['eta'\] for DDIMInv"):
            fastdiff.invert(_toy, x, sampler=sampler, eta=0.5)


# ---------------------------------------------------------------------------------------------- viz
def test_to_uint8_clamps_out_of_range_values():
    """Model-space values outside [-1, 1] saturate at 0 / 255 (a sample slightly past 1 is
    white, not wrapped around to grey), and the rest round to the nearest pixel: x = 1.5,
    -2, 0, 0.5 -> 255, 0, 128 (127.5 rounds to even), 191 (191.25). Mutant: viz.to_uint8
    without ``.clamp(-1, 1)`` (1.5 -> 319 -> 63 after the uint8 cast)."""
    from fastdiff.viz import to_uint8

    x = torch.tensor([1.5, -2.0, 0.0, 0.5, 1.0, -1.0]).reshape(1, 1, 2, 3)
    assert to_uint8(x).flatten().tolist() == [255, 0, 128, 191, 255, 0]


def test_forward_strip_noises_every_frame_with_one_eps():
    """forward_strip draws one eps from its seed and noises x0 with it at every frame, at
    t = linspace(0, T - 1, frames) rounded (DDPM eq. 4 with a fixed eps: the signal fades into
    the same noise). A stand-in schedule records what q_sample gets. Mutants: viz.py drawing
    one eps per frame, t from 1."""
    from fastdiff.viz import forward_strip

    class Recorder:
        num_train_timesteps, beta_schedule, calls = 1000, "stand-in", []

        def q_sample(self, x0, t, noise):
            self.calls.append((t.clone(), noise.clone()))
            return x0.clamp(-1, 1)

    sch = Recorder()
    x0 = torch.rand(1, 8, 8) * 2 - 1
    assert forward_strip(x0, sch, num_frames=4, seed=3).size[0] > 0
    ((t, noise),) = sch.calls
    assert t.tolist() == [0, 333, 666, 999]
    eps = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(n, eps[0]) for n in noise)


def test_stack_images_puts_gap_pixels_between_not_after():
    """stack_images stacks on white, ``gap`` rows between consecutive images and none after the
    last: a 3 x 2 and a 5 x 4 black image with gap 3 are a 5 x 9 picture, written out here.
    Mutant: viz.py height ``gap * len(images)`` (3 white rows too many at the bottom)."""
    from fastdiff.viz import stack_images

    got = stack_images([Image.new("L", (3, 2), 0), Image.new("L", (5, 4), 0)], gap=3)
    want = [[0, 0, 0, 255, 255]] * 2 + [[255] * 5] * 3 + [[0] * 5] * 4
    assert got.size == (5, 9) and np.asarray(got).tolist() == want


def test_make_grid_places_each_image_after_pad_pixels():
    """make_grid's layout: image i at row i // ncol, column i % ncol, each cell ``pad`` pixels
    after the previous one, ``pad`` around: 3 uint8 images of 1 x 2 pixels (values 10, 20,
    30), 2 per row, pad 1 (pad value 255) is the 7 x 5 picture written out here. Mutant:
    viz.py ``x0 = pad + q * ws`` (columns without the pads between)."""
    from fastdiff.viz import make_grid

    x = torch.tensor([10, 20, 30], dtype=torch.uint8).reshape(3, 1, 1, 1).expand(3, 1, 1, 2)
    W = 255
    want = [[W, W, W, W, W, W, W],
            [W, 10, 10, W, 20, 20, W],
            [W, W, W, W, W, W, W],
            [W, 30, 30, W, W, W, W],
            [W, W, W, W, W, W, W]]  # fmt: skip
    got = make_grid(x, nrow=2, scale=1, pad=1)
    assert got.mode == "L" and np.asarray(got).tolist() == want


def test_save_png_to_a_directory_is_refused_before_writing(tmp_path):
    """check_writable refuses a directory (even one named like a PNG) with a ValueError saying
    so, and save_png writes nothing there (no temporary left beside it). Mutant: viz.py
    without the ``p.is_dir()`` test (os.replace onto the directory: an OSError after the
    picture was written)."""
    from fastdiff.viz import check_writable, save_png

    d = tmp_path / "grid.png"
    d.mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        check_writable(d)
    with pytest.raises(ValueError, match="is a directory"):
        save_png(torch.zeros(1, 1, 4, 4), d)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"] and not any(d.iterdir())


# --------------------------------------------------------------------------------------------- data
def test_load_digits_is_scikit_learns_images_scaled_and_upsampled():
    """load_digits(8) is scikit-learn's 8 x 8 digits / 16 mapped to [-1, 1] (pixel 16 -> 1,
    0 -> -1, 8 -> 0), and load_digits(16) their bilinear (align_corners=False) upsampling of
    the [0, 1] images, then mapped. Mutants: data.py dividing by 15 (clamped: 15 and 16 both
    white), align_corners=True."""
    sk = pytest.importorskip("sklearn.datasets").load_digits()
    from fastdiff.data import load_digits

    x8, y = load_digits(8)
    img = torch.as_tensor(sk.images, dtype=torch.float64)[:, None] / 16
    assert x8.shape == (1797, 1, 8, 8) and y.tolist() == sk.target.tolist()
    torch.testing.assert_close(x8.double(), img * 2 - 1, rtol=0, atol=1e-7)
    up = torch.nn.functional.interpolate(img, size=(16, 16), mode="bilinear", align_corners=False)
    x16, _ = load_digits()
    torch.testing.assert_close(x16.double(), up.clamp(0, 1) * 2 - 1, rtol=0, atol=1e-6)


def test_load_digits_refuses_sizes_below_the_8_x_8_source():
    """load_digits upsamples scikit-learn's 8 x 8 images; a smaller size is refused by name
    (ValueError) rather than silently downsampled. Mutant: data.py ``size < 1``."""
    from fastdiff.data import load_digits

    for size in (4, 7):
        with pytest.raises(ValueError, match="size: expected an int >= 8"):
            load_digits(size)


def test_split_sizes_round_and_parts_partition_the_set():
    """split() holds round(N * test_fraction) test samples (10 x 0.27 = 2.7 -> 3, not 2), the
    two parts partition the set (every index once, pairs kept), and the seed picks the
    permutation. Mutants: data.py truncating ``int(N * f)``, overlapping parts."""
    from fastdiff.data import split

    x, y = torch.arange(10.0)[:, None] * 10, torch.arange(10)
    x_tr, y_tr, x_te, y_te = split(x, y, test_fraction=0.27, seed=5)
    assert (len(y_tr), len(y_te)) == (7, 3)
    assert sorted(y_tr.tolist() + y_te.tolist()) == list(range(10))
    assert torch.equal(x_tr[:, 0], y_tr * 10.0) and torch.equal(x_te[:, 0], y_te * 10.0)
    assert split(x, y, 0.27, seed=5)[3].tolist() == y_te.tolist()
    assert any(split(x, y, 0.27, seed=s)[3].tolist() != y_te.tolist() for s in (6, 7, 8))
