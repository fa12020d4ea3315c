"""Blended inpainting through ``fastdiff.sample(image=..., mask=...)`` for every sampler, vs a
diffusers loop written as StableDiffusionInpaintPipeline runs a 4-channel UNet (and
StableDiffusion3InpaintPipeline a flow model, ``scale_noise``): ``get_timesteps`` /
``set_begin_index``, the start (pure noise at strength 1, ``is_strength_max``; else the noised
image), and after every ``scheduler.step`` the known region replaced by the image noised to
``timesteps[i + 1]`` with the start's noise (the clean image after the last step). Same model,
same noise (the same generator on both sides), fp32: relative error <= 1e-5.

At strength 1 both start from diffusers' ``init_noise_sigma`` z (sigma_0 z under linspace /
trailing spacing for Euler, LMS, Heun, DPM2: fastdiff's ``init_noise_scale``) and blend with
z. LCM / TCD take the strength as their grid's
option (LatentConsistencyModelImg2ImgPipeline's ``set_timesteps(strength=...)``), as img2img.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_no_host_sync
from test_img2img import (
    CASES,
    SHAPE,
    _image,
    _rel,
    _scheduler,
    cli_sample_fails,
    pipeline_timesteps,
)
from test_img2img import _model as _pointwise

import fastdiff
from fastdiff._inpaint import blend_noising
from fastdiff.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")

RTOL = 1e-5
N, C, H, W = SHAPE


def _model(x: torch.Tensor, t, encoder_hidden_states=None) -> torch.Tensor:
    """test_img2img's stand-in network plus a spatial mix (a pointwise model would never carry
    the known region into the repainted one, and a wrong blend level there would go unseen)."""
    return _pointwise(x, t, encoder_hidden_states) + 0.2 * x.roll(1, -1) - 0.1 * x.roll(2, -2)


def _masks() -> dict[str, torch.Tensor]:
    """binary [N x 1 x H x W] (broadcast over channels), soft [N x C x H x W], soft [1 x 1 x H
    x W] (one mask for the batch): 1 = repaint, 0 = keep."""
    binary = torch.zeros(N, 1, H, W)
    binary[0, :, 2:6, 1:5] = 1
    binary[1, :, 4:, :3] = 1
    g = torch.Generator().manual_seed(3)
    soft = torch.rand(SHAPE, generator=g)
    soft[soft < 0.2] = 0.0
    soft[soft > 0.8] = 1.0
    row = torch.linspace(0, 1, W).expand(1, 1, H, W).contiguous()
    return {"binary": binary, "soft": soft, "soft_1x1": row}


def _diffusers_inpaint(name, sch, image, mask, strength, steps, gen, cond=None, gs=None):
    """The inpaint pipeline's loop (4-channel UNet / 16-channel transformer branch)."""
    timesteps = pipeline_timesteps(name, sch, steps, strength)
    noise = torch.randn(image.shape, generator=gen)  # prepare_latents' randn_tensor

    def noised(t):
        t = t.repeat(image.shape[0])
        if hasattr(sch, "scale_noise"):
            return sch.scale_noise(image, t, noise)
        return sch.add_noise(image, noise, t)

    if strength == 1.0:  # is_strength_max: pure noise
        x = noise * getattr(sch, "init_noise_sigma", 1.0)
    else:
        x = noised(timesteps[:1])
    for i, t in enumerate(timesteps):
        inp = torch.cat([x, x]) if gs is not None else x
        inp = sch.scale_model_input(inp, t) if hasattr(sch, "scale_model_input") else inp
        out = _model(inp, t, **({"encoder_hidden_states": cond} if cond is not None else {}))
        if gs is not None:
            u, c = out.chunk(2)
            out = u + gs * (c - u)
        step_kw = {"generator": gen} if "generator" in sch.step.__code__.co_varnames else {}
        x = sch.step(out, t, x, **step_kw).prev_sample
        known = noised(timesteps[i + 1 : i + 2]) if i < len(timesteps) - 1 else image
        x = (1 - mask) * known + mask * x
    return x


def _ours(name, mask, strength, seed=0, image=None, **kw):
    image = _image(seed) if image is None else image
    return fastdiff.sample(
        _model, CASES[name][2], sampler=name, schedule=_scheduler(name), image=image, mask=mask,
        strength=strength, generator=torch.Generator().manual_seed(seed), **kw,
    )  # fmt: skip


def test_every_sampler_has_a_case():
    # (inversions and samplers with no_img2img: refused, tested in their files)
    names = {k for k, c in SAMPLERS.items() if not (c.inverts or getattr(c, "no_img2img", None))}
    # ipndm: diffusers' IPNDMScheduler has no add_noise (its start is written out in test_ipndm)
    names -= {"ipndm"}
    # cosine_dpm++, dpm++_sde: diffusers' scheduler needs torchsde (img2img, inpainting:
    # test_cosine_dpm, test_dpmpp_sde)
    names -= {"dpmsolver++", "dpm-solver++", "cosine_dpm++", "dpm++_sde"}
    assert names <= set(CASES), sorted(names - set(CASES))


# (samplers with no_inpaint, e.g. sa_solver: refused, tested in their files)
INPAINTS = [n for n in sorted(CASES) if not getattr(SAMPLERS[n], "no_inpaint", None)]
PARITY = [(n, m) for n in INPAINTS for m in ("binary", "soft", "soft_1x1")]


@pytest.mark.parametrize("name,mname", PARITY)
def test_inpaint_matches_diffusers_pipeline_loop(name, mname):
    """Strength 1 (pure noise) and 0.6, binary / soft / one-for-the-batch masks; the kept
    region (mask 0) of the result is the image exactly; the repainted region is not."""
    image, mask = _image(0), _masks()[mname]
    for strength in (1.0, 0.6):
        gen = torch.Generator().manual_seed(0)
        steps = CASES[name][2]
        theirs = _diffusers_inpaint(name, _scheduler(name), image, mask, strength, steps, gen)
        ours = _ours(name, mask, strength)
        assert ours.shape == SHAPE and torch.isfinite(ours).all()
        err = _rel(ours, theirs)
        assert err <= RTOL, f"{name} strength {strength} {mname}: rel err {err:.2e}"
        keep = (mask == 0).expand(SHAPE)
        assert torch.equal(ours[keep], image[keep]), (name, strength, mname)
        if mname == "binary":
            assert (ours[~keep] - image[~keep]).abs().max() > 1e-2


def test_dpm2_blends_diffusers_interleaved_sigma():
    """DPM2's first stage lands on the log-midpoint, but diffusers' loop noises the known region
    to sigmas[step_index], the step's end sigma: blend_noising follows it (add_noise's level of
    the midpoint would differ from diffusers' loop, which the parity test above checks)."""
    from fastdiff._sampler_setup import resolve_sampler

    smp = resolve_sampler(None, "dpm2", 10, _scheduler("dpm2"), None, None, {})
    a, s = blend_noising(smp, 1)
    a_mid, s_mid = smp._noising(1)
    assert a == pytest.approx(a_mid, rel=1e-12) and abs(s - s_mid) > 0.1
    assert s == pytest.approx(a * float(smp.sigmas()[1]), rel=1e-12)
    assert blend_noising(smp, 2) == pytest.approx(smp._noising(2), rel=1e-12)


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpm++", "flow_euler", "edm_euler"])
def test_mask_of_ones_is_the_plain_run_and_zeros_the_image(name):
    """All ones at strength 1: exactly sample(noise=z) (a pure-noise start, nothing blended);
    all zeros: exactly the image."""
    image, z = _image(1), torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    kw = {"sampler": name, "schedule": _scheduler(name), "noise": z}
    plain = fastdiff.sample(_model, CASES[name][2], **kw)
    ones = fastdiff.sample(_model, CASES[name][2], image=image, mask=torch.ones(SHAPE), **kw)
    assert torch.equal(ones, plain)
    zeros = fastdiff.sample(_model, CASES[name][2], image=image, mask=torch.zeros(1, 1, H, W),
                            strength=0.6, **kw)  # fmt: skip
    assert torch.equal(zeros, image)


@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler", "heun", "flow_euler", "unipc", "lcm"])
def test_inpaint_with_guidance_matches_diffusers(name):
    """The mask blends the sample, not the [uncond, cond] batch of the model call."""
    cond = torch.randn(2 * N, 3, generator=torch.Generator().manual_seed(7))
    cfg = {"clip_sample": False} if name == "ddim" else {}
    image, mask = _image(2), _masks()["binary"]
    for strength in (1.0, 0.6):
        theirs = _diffusers_inpaint(name, _scheduler(name, **cfg), image, mask, strength,
                                    CASES[name][2], torch.Generator().manual_seed(2), cond=cond,
                                    gs=4.0)  # fmt: skip
        ours = fastdiff.sample(
            _model, CASES[name][2], sampler=name, schedule=_scheduler(name, **cfg), image=image,
            mask=mask, strength=strength, generator=torch.Generator().manual_seed(2),
            cond=cond[N:], uncond=cond[:N], guidance_scale=4.0,
        )  # fmt: skip
        assert _rel(ours, theirs) <= RTOL, (name, strength)


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "dpm2_a", "tcd", "heun"])
def test_generator_list_equals_single_sample_runs(name):
    image, mask = _image(3), _masks()["binary"]
    for strength in (1.0, 0.7):
        batch = fastdiff.sample(
            _model, CASES[name][2], sampler=name, schedule=_scheduler(name), image=image,
            mask=mask, strength=strength,
            generator=[torch.Generator().manual_seed(k) for k in range(N)],
        )  # fmt: skip
        for k in range(N):
            one = fastdiff.sample(
                _model, CASES[name][2], sampler=name, schedule=_scheduler(name),
                image=image[k : k + 1], mask=mask[k : k + 1], strength=strength,
                generator=torch.Generator().manual_seed(k),
            )  # fmt: skip
            torch.testing.assert_close(batch[k : k + 1], one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["heun", "dpm++", "flow_euler"])
def test_callback_and_trajectory_hold_the_blended_samples(name):
    """callback x and trajectory x rows: the start, then each call's blended result (known
    region = the image noised to the next call's level, the image after the last call); x0 rows
    are the steps' own predictions (not blended)."""
    image, mask, steps = _image(2), _masks()["binary"], CASES[name][2]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    seen = []
    out, traj = fastdiff.sample(
        _model, steps, sampler=name, schedule=_scheduler(name), image=image, mask=mask,
        strength=0.55, noise=z, return_trajectory=True,
        callback=lambda i, t, x: seen.append((i, x.clone())),
    )  # fmt: skip
    calls = len(traj["timesteps"])
    assert [i for i, _ in seen] == list(range(calls)) and traj["x"].shape[0] == calls + 1
    for k, (_, x) in enumerate(seen):
        assert torch.equal(traj["x"][k + 1], x)
    assert torch.equal(traj["x"][-1], out)
    from fastdiff._sampler_setup import resolve_sampler

    smp = resolve_sampler(None, name, steps, _scheduler(name), None, None, {})
    if smp.strength_option:
        smp = resolve_sampler(None, name, steps, _scheduler(name), None, None, {"strength": 0.55})
    start = smp.img2img_start(0.55)
    keep = (mask == 0).expand(SHAPE)
    for k in range(calls - 1):
        a, s = blend_noising(smp, start + k + 1)
        want = image * a + z * s
        torch.testing.assert_close(traj["x"][k + 1][keep], want[keep], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(traj["x"][0], smp.add_noise(image, z, start), rtol=0, atol=0)
    assert not torch.equal(traj["x0"][-1][keep], image[keep])  # x0 rows are not blended


@pytest.mark.parametrize("name", ["dpm++", "unipc", "heun", "pndm", "euler_a", "flow_euler"])
def test_cuda_graph_loop_equals_eager(name, fake_cuda_graphs, monkeypatch):
    """The graphed loop (faked on CPU): the blend is part of the captured step; one capture per
    mask shape, replayed with other images / masks / strengths = the eager loop."""
    from fastdiff import api

    eager_loop = api._sample_eager

    def run(graphed, strength, mask, seed):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        return _ours(name, mask, strength, seed=seed, return_trajectory=True)

    masks = _masks()
    masks["flipped"] = masks["binary"].flip(-1)  # the binary capture, other mask values
    for strength, mname, seed in ((0.6, "binary", 0), (1.0, "flipped", 1), (0.8, "binary", 2),
                                  (1.0, "soft", 3), (0.6, "soft", 4)):  # fmt: skip
        eager, etraj = run(False, strength, masks[mname], seed)
        out, traj = run(True, strength, masks[mname], seed)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["x"], etraj["x"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["x0"], etraj["x0"], rtol=1e-6, atol=1e-6)
    assert len(fake_cuda_graphs) == 2  # binary [N x 1 x H x W], soft [N x C x H x W]


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["dpm++", "unipc", "heun", "euler_a"])
def test_cuda_graph_inpaint_equals_eager_on_gpu(name):
    image, mask = _image(6).cuda(), _masks()["binary"].cuda()
    kw = {"sampler": name, "schedule": _scheduler(name), "image": image, "mask": mask}
    for strength in (1.0, 0.6):
        runs = [
            fastdiff.sample(
                _model,
                10,
                generator=torch.Generator("cuda").manual_seed(0),
                strength=strength,
                cuda_graph=graphed,
                **kw,
            )  # fmt: skip
            for graphed in (False, True)
        ]
        torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5)
        keep = (mask == 0).expand(SHAPE)
        assert torch.equal(runs[1][keep], image[keep])


# ------------------------------------------------------------------------------------ errors
IMG = torch.zeros(SHAPE)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"mask": torch.ones(SHAPE)}, ValueError, "mask: inpainting needs image="),
        ({"image": IMG, "mask": [[1.0]]}, TypeError, "mask: expected a torch.Tensor"),
        ({"image": IMG, "mask": torch.ones(SHAPE, dtype=torch.bool)}, TypeError,
         "mask: expected a floating"),
        ({"image": IMG, "mask": torch.ones(SHAPE, dtype=torch.uint8)}, TypeError,
         "mask: expected a floating"),
        ({"image": IMG, "mask": torch.full(SHAPE, 1.5)}, ValueError, r"mask: expected values in"),
        ({"image": IMG, "mask": torch.full(SHAPE, -0.1)}, ValueError, r"mask: expected values in"),
        ({"image": IMG, "mask": torch.full(SHAPE, float("nan"))}, ValueError, "or NaN"),
        ({"image": IMG, "mask": torch.ones(N, 1, H, W + 1)}, ValueError, "mask: expected a shape"),
        ({"image": IMG, "mask": torch.ones(2 * N, 1, H, W)}, ValueError, "mask: expected a shape"),
        ({"image": IMG, "mask": torch.ones(1, *SHAPE)}, ValueError, "mask: expected a shape"),
        ({"image": IMG, "mask": torch.ones(SHAPE, device="meta")}, ValueError,
         "mask: expected image's device"),
        ({"image": IMG, "mask": torch.ones(SHAPE), "sampler": "ddim_inverse", "noise": IMG},
         ValueError, "mask: DDIMInverseSampler runs x_0 -> x_T"),
        ({"image": IMG, "mask": torch.ones(SHAPE), "sampler": "flow_euler_inverse",
          "schedule": None, "noise": IMG}, ValueError, "mask: FlowMatchEulerInverseSampler"),
        ({"image": IMG, "mask": torch.ones(SHAPE), "strength": 0.05}, ValueError,
         "strength: 0.05 leaves no"),
    ],
)  # fmt: skip
def test_errors_name_the_argument_and_nothing_runs(kw, exc, match):
    calls = []

    def model(x, t):
        calls.append(1)
        return _model(x, t)

    kw = {"sampler": "ddim", **kw}
    if "image" not in kw:
        kw["shape"] = SHAPE[1:]
    with pytest.raises(exc, match=match):
        fastdiff.sample(model, 10, **kw)
    assert calls == []


# ---------------------------------------------------------------------------------------- CLI
def test_cli_mask_reaches_sample_white_repaints(tmp_path, monkeypatch):
    """fastdiff sample --init-image --mask: the mask picture, grayscale, resized to the image,
    binarized at 50% (white = 1 = repaint), one per sample, reaches sample(); the run
    keeps the picture where the mask is black."""
    import numpy as np
    from PIL import Image

    from fastdiff.cli import main

    pix = ((np.arange(16 * 16).reshape(16, 16) * 7) % 256).astype(np.uint8)
    Image.fromarray(pix).save(tmp_path / "in.png")
    m = np.zeros((32, 32), dtype=np.uint8)  # twice the model's size: resized
    m[8:24, 4:20] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    seen, real = [], fastdiff.sample

    def spy(model, **kw):
        seen.append((kw, real(model, **kw)))
        return seen[-1][1]

    monkeypatch.setattr(fastdiff, "sample", spy)
    argv = [
        "sample",
        "--init-image",
        str(tmp_path / "in.png"),
        "--mask",
        str(tmp_path / "mask.png"),
    ]
    out = tmp_path / "out.png"
    assert main([*argv, "--n", "2", "--steps", "4", "--out", str(out), "--quiet"]) == 0
    assert out.is_file()
    ((kw, x),) = seen
    mask, image = kw["mask"], kw["image"]
    want = torch.zeros(16, 16)
    want[4:12, 2:10] = 1.0
    assert mask.shape == (2, 1, 16, 16) and torch.equal(mask[1, 0], want)
    assert kw["strength"] is None  # sample's inpainting default, 1.0
    keep = (mask == 0).expand_as(image)
    assert torch.equal(x[keep], image[keep]) and not torch.equal(x, image)


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--mask", "{png}"], "--mask needs --init-image"),
        (["--init-image", "{png}", "--mask", "missing.png"], "--mask: file not found"),
        (["--init-image", "{png}", "--mask", "{txt}"], "--mask: cannot read"),
    ],
)
def test_cli_mask_errors_write_nothing(argv, msg, tmp_path, capsys):
    code, err = cli_sample_fails(argv, tmp_path, capsys)
    assert code == 2 and msg in err  # 2: bad input, as the other CLI refusals


# ------------------------------------------------------------- variants, layouts, half precision
@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_flow_sigma_multistep_inpaint_matches_diffusers(cls):
    """dpm++ / unipc on a flow-matching grid (use_flow_sigmas): their add_noise is the flow
    line (1 - sigma) x0 + sigma z, blended as diffusers' loop does."""
    cfg = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
    name = "dpm++" if cls.startswith("DPM") else "unipc"
    image = _image(4)
    for mname in ("binary", "soft"):
        mask = _masks()[mname]
        for strength in (1.0, 0.6):
            theirs = _diffusers_inpaint(name, getattr(diffusers, cls)(**cfg), image, mask,
                                        strength, 10, torch.Generator().manual_seed(4))  # fmt: skip
            ours = fastdiff.sample(
                _model, 10, schedule=getattr(diffusers, cls)(**cfg), image=image, mask=mask,
                strength=strength, generator=torch.Generator().manual_seed(4),
            )  # fmt: skip
            assert _rel(ours, theirs) <= RTOL, (cls, mname, strength)


def test_channels_last_noise_keeps_its_layout_and_values():
    """A channels_last noise: the blend keeps x's layout (image and z follow it), same values."""
    image, mask = _image(5), _masks()["soft"]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    zcl = z.contiguous(memory_format=torch.channels_last)
    for strength in (1.0, 0.7):  # x_T = z (its layout), or the noised image (the image's)
        kw = {"sampler": "dpm++", "image": image, "mask": mask, "strength": strength}
        plain = fastdiff.sample(_model, 10, noise=z, **kw)
        cl = fastdiff.sample(_model, 10, noise=zcl, **kw)
        assert cl.is_contiguous(memory_format=torch.channels_last) == (strength == 1.0)
        assert torch.equal(cl, plain)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inpaint(dtype):
    """fp16 / bf16 image and mask: the result in that dtype, the kept region the image exactly,
    and its error vs the fp32 run at most 2x that of the same run without a mask (img2img)."""
    image, mask = _image(6), _masks()["soft"]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))

    def run(dt, m):
        return fastdiff.sample(_model, 10, sampler="dpm++", image=image.to(dt), mask=m,
                               noise=z.to(dt), strength=0.7)  # fmt: skip

    half, full = run(dtype, mask.to(dtype)), run(torch.float32, mask)
    assert half.dtype == dtype and torch.isfinite(half).all()
    keep = (mask == 0).expand(SHAPE)
    assert torch.equal(half[keep], image.to(dtype)[keep])
    yardstick = _rel(run(dtype, None), run(torch.float32, None))
    assert _rel(half, full) <= 2 * yardstick, (_rel(half, full), yardstick)


@pytest.mark.parametrize("name", ["dpm++", "heun", "euler_a", "flow_euler"])
def test_no_host_sync_inside_the_loop(name):
    """The blend reads its (a, s) rows from a device table: no .item() / host read once the
    model has been called (the mask's range check runs before the loop)."""

    def run(model):
        gen = torch.Generator().manual_seed(7)
        return fastdiff.sample(model, 6, sampler=name, image=_image(7), mask=_masks()["soft"],
                               strength=0.7, generator=gen)  # fmt: skip

    assert_no_host_sync(run, _model)
