"""IPNDMSampler ("ipndm") vs diffusers' IPNDMScheduler, and through sample() (no host sync, the
fake CUDA-graph loop and the unknown-option refusal are in the shared contract:
tests/_sampler_cases.py).

iPNDM steps DDIM's transfer with the Adams-Bashforth combination (orders 1-4) of the noise
estimates e = sigma x + alpha v of a v-prediction model of continuous time. Per step both sides
get the same sample and model output; ours must agree with a float64 restatement of the
algorithm (written here from the paper's formulas, not from the sampler's rows) to a relative
error <= 1e-5 (max |ours - ref| / max |ref|), and with the stock scheduler to 1e-5 plus
diffusers' own fp32 error.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from _sampler_cases import assert_step_parity, rel
from helpers import PARITY_RTOL, assert_fa_rule, backend_cases, case_id

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import SAMPLERS, IPNDMSampler, make_sampler

diffusers = pytest.importorskip("diffusers")

SHAPE, RTOL = (2, 3, 6, 5), PARITY_RTOL
STEPS = [1, 2, 5, 12, 25]
AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
      4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}  # fmt: skip


def vtoy(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in v-model of x and continuous t in [0, 1]."""
    tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.6 * torch.tanh(0.8 * x + 0.1) + 0.5 * torch.sin(3.0 * tt) - 0.3 * tt * x


def _sched(n: int):
    sch = diffusers.IPNDMScheduler()
    sch.set_timesteps(n)
    return sch


def _diffusers_loop(n: int, z: torch.Tensor, model=vtoy, begin: int = 0) -> torch.Tensor:
    sch = _sched(n)
    if begin:
        sch.set_begin_index(begin)
    x = z
    for t in sch.timesteps[begin:]:
        x = sch.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


class Ref64:
    """float64 iPNDM (module docstring of fastdiff/samplers/ipndm.py) on diffusers' grid:
    e_i = sigma_i x + alpha_i v, e' = sum_j AB_j e_{i-j}, x0' = (x - sigma_i e') / max(alpha_i,
    1e-8), x_{i+1} = alpha_{i+1} x0' + sigma_{i+1} e'."""

    def __init__(self, n: int) -> None:
        sch = _sched(n)
        self.alpha = sch.alphas.double()
        self.sigma = sch.betas.double()
        self.ets: list[torch.Tensor] = []

    def step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        x, v = x.double(), v.double()
        self.ets.append(self.sigma[i] * x + self.alpha[i] * v)
        w = AB[min(len(self.ets), 4)]
        e = sum(wj * self.ets[-1 - j] for j, wj in enumerate(w))
        x0 = (x - self.sigma[i] * e) / max(float(self.alpha[i]), 1e-8)
        return self.alpha[i + 1] * x0 + self.sigma[i + 1] * e


# ------------------------------------------------------------------------------ grid
@pytest.mark.parametrize("n", [*STEPS, 50, 7])
def test_grid_and_timesteps_are_diffusers(n):
    sch, smp = _sched(n), IPNDMSampler(None, n)
    assert smp.timesteps.dtype == torch.float32
    assert torch.equal(smp.timesteps, sch.timesteps)
    assert np.array_equal(smp.alphas, sch.alphas.double().numpy())
    assert np.array_equal(smp.sigmas, sch.betas.double().numpy())
    assert len(smp) == n and smp.sigmas[0] == 1.0 and smp.alphas[0] == 0.0
    assert smp.sigmas[-1] == 0.0 and smp.alphas[-1] == 1.0


# ------------------------------------------------------------------------------ per step
@pytest.mark.parametrize("n", STEPS)
def test_every_step_matches_diffusers_and_float64(n):
    """Each step from diffusers' own sample and model output: ours vs the float64 restatement
    (<= 1e-5) and vs the stock scheduler (<= 1e-5 + its own fp32 error)."""
    sch, smp, ref = _sched(n), IPNDMSampler(None, n), Ref64(n)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(n))
    for i, t in enumerate(sch.timesteps):
        v = vtoy(x, t.expand(SHAPE[0]))
        want = sch.step(v, t, x).prev_sample
        want64 = ref.step(v, i, x)
        got = smp.step(v, i, x)
        if want64.abs().max() == 0:  # one step: x_1 = sigma_1 x_0 = 0
            assert torch.equal(got, want) and not got.any()
        else:
            assert_step_parity(got, want, want64, f"steps={n} i={i}")
        x = want


def test_first_step_is_diffusers_bit_for_bit():
    """On the pure-noise first level (alpha_0 = 0, sigma_0 = 1) diffusers' x0' is exactly 0
    and x_1 = sigma_1 x_0 whatever the model says; the row is that, not 1e8-sized terms."""
    smp, sch = IPNDMSampler(None, 10), _sched(10)
    x = torch.randn(SHAPE)
    v = 50.0 * torch.randn(SHAPE)
    got = smp.step(v, 0, x)
    torch.testing.assert_close(got, sch.step(v, sch.timesteps[0], x).prev_sample, rtol=0, atol=0)
    torch.testing.assert_close(got, float(smp.sigmas[1]) * x, rtol=0, atol=0)
    row = smp.coef64[0]
    assert row[2] == 0.0 and row[4] == smp.sigmas[1] and np.abs(row).max() <= 1.0


def test_rows_fold_the_transfer():
    """Row i (full history) = [sigma, -alpha, alpha'/alpha, 0, k w0, k w1, k w2, 1, 0, 0, k w3,
    0], k = sigma' - alpha' sigma / alpha, w the order-min(i + 1, 4) Adams-Bashforth weights."""
    smp = IPNDMSampler(None, 9)
    a, s = smp.alphas, smp.sigmas
    for i in range(1, 9):
        w = AB[min(i + 1, 4)] + [0.0] * (4 - min(i + 1, 4))
        k = s[i + 1] - a[i + 1] * s[i] / a[i]
        want = [s[i], -a[i], a[i + 1] / a[i], 0, k * w[0], k * w[1], k * w[2], 1, 0, 0,
                k * w[3], 0]  # fmt: skip
        np.testing.assert_allclose(smp.coef64[i], want, rtol=1e-14, atol=1e-15)


# ------------------------------------------------------------------------------ whole runs
@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("as_config", [False, True], ids=["object", "saved-config"])
def test_sample_with_the_scheduler_is_diffusers_loop(n, as_config):
    """sample(schedule=IPNDMScheduler()) infers "ipndm" (no warning), calls the model at
    diffusers' float timesteps and lands on diffusers' loop (float64: <= 1e-5)."""
    sch = diffusers.IPNDMScheduler()
    arg = json.loads(sch.to_json_string()) if as_config else sch
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10 + n))
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return vtoy(x, t)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fastdiff.sample(model, steps=n, schedule=arg, noise=z)
    ts = _sched(n).timesteps
    assert len(seen) == n and all(torch.equal(t, ts[i].expand(2)) for i, t in enumerate(seen))
    want = _diffusers_loop(n, z)
    ref = Ref64(n)
    x64 = z.double()
    for i, t in enumerate(ts):
        x64 = ref.step(vtoy(x64, t.double().expand(2)), i, x64)
    if n == 1:
        assert not got.any() and not want.any()
        return
    assert rel(got, x64) <= RTOL
    assert rel(got, want) <= RTOL + rel(want, x64)


def test_sample_by_name_guidance_and_channels_last():
    """sampler="ipndm" equals the inferred run; guidance combines [uncond, cond] in the op as
    stepping with the combined output does; a channels_last x_T keeps its layout."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    a = fastdiff.sample(vtoy, steps=8, sampler="ipndm", noise=z)
    b = fastdiff.sample(vtoy, steps=8, schedule=diffusers.IPNDMScheduler(), noise=z)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    cl = fastdiff.sample(vtoy, steps=8, sampler="ipndm",
                         noise=z.contiguous(memory_format=torch.channels_last))  # fmt: skip
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, a, rtol=1e-6, atol=1e-6)
    cond, uncond, w = torch.randn(2, 4), torch.randn(2, 4), 3.0

    def cmodel(x, t, encoder_hidden_states=None):
        return vtoy(x, t) + encoder_hidden_states.mean(1).reshape(-1, 1, 1, 1)

    got = fastdiff.sample(cmodel, steps=8, sampler="ipndm", noise=z, cond=cond, uncond=uncond,
                          guidance_scale=w)  # fmt: skip
    smp, x = IPNDMSampler(None, 8), z
    for i, t in enumerate(smp.timesteps):
        tt = t.expand(2)
        u, c = cmodel(x, tt, uncond), cmodel(x, tt, cond)
        x = smp.step(u + w * (c - u), i, x)
    assert rel(got, x) <= 1e-6
    plain = fastdiff.sample(cmodel, steps=8, sampler="ipndm", noise=z, cond=cond)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_trajectory_x0_rows():
    """return_trajectory's x0 rows: (x - sigma_i e_i) / alpha_i = alpha_i x - sigma_i v (0 on
    pure noise, as diffusers' first x0'); the fake-graph loop's are the same."""
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    out, traj = fastdiff.sample(vtoy, steps=6, sampler="ipndm", noise=z, return_trajectory=True)
    smp = IPNDMSampler(None, 6)
    assert not traj["x0"][0].any()
    for i in range(1, 6):
        x, v = traj["x"][i], vtoy(traj["x"][i], smp.timesteps[i].expand(2))
        want = float(smp.alphas[i]) * x - float(smp.sigmas[i]) * v
        torch.testing.assert_close(traj["x0"][i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("begin", [1, 3, 6])
def test_a_run_from_a_later_step_warms_up_as_diffusers(begin):
    """A run that starts at step s (img2img; diffusers' set_begin_index(s)) has no history:
    orders 1, 2, 3, 4 again, as diffusers' empty ets list. The CUDA-graph loop's run_row picks
    the same rows as the eager step."""
    n = 12
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(begin))
    want = _diffusers_loop(n, z, begin=begin)
    smp, x = IPNDMSampler(None, n), z
    for i in range(begin, n):
        x = smp.step(vtoy(x, smp.timesteps[i].expand(2)), i, x)
    assert 0 < rel(x, want) <= 2 * RTOL
    for i in range(begin, n):
        k = min(i - begin, 3)
        tab = smp._since64[k] if k < 3 else smp.coef64
        torch.testing.assert_close(smp.run_row(i, begin, "cpu"),
                                   torch.from_numpy(tab[i]).float(), rtol=0, atol=0)  # fmt: skip
    # a full run from step 0 differs (its step `begin` has history)
    full = _diffusers_loop(n, z)
    assert rel(full, want) > 1e-3


def test_history_reset_and_reuse():
    """A reused sampler starts without history; a step out of order starts a new run (first
    order at that step)."""
    smp = IPNDMSampler(None, 6)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    one = fastdiff.sample(vtoy, sampler=smp, noise=z)
    two = fastdiff.sample(vtoy, sampler=smp, noise=z)
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    v = vtoy(z, smp.timesteps[3])
    again = smp.step(v, 3, z)
    ref = Ref64(6)
    ref.ets = []
    want = ref.step(v, 3, z)  # first order at step 3
    assert rel(again, want) <= RTOL
    full = IPNDMSampler(None, 6)
    x = z
    for i in range(3):
        x = full.step(vtoy(x, full.timesteps[i]), i, x)
    assert rel(full.step(v, 3, z), want) > 1e-3  # with history: another row


# ------------------------------------------------------------------------------ backends
@pytest.mark.parametrize("case", backend_cases("unipc_step"), ids=case_id)
def test_every_backend_matches_diffusers(case):
    """A guided run at an odd size on each backend of the fused op (cpu: the C++ kernel, triton
    under TRITON_INTERPRET=1) equals diffusers' loop on the combined output; channels_last x
    too. fp16: the FlashAttention rule against float64, diffusers' own fp16 loop as eager."""
    dev, backend = case
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 5, 7, generator=g)
    w = torch.randn(4, 3, 5, 7, generator=g)
    gs = 2.5

    def raw(x, t):
        xx = torch.cat([x, x]).float()
        return (torch.tanh(0.4 * xx) + 0.2 * w + torch.sin(3 * t[:1].float())).to(x.dtype)

    def combined(x, t):
        u, c = raw(x, t.expand(x.shape[0])).chunk(2)
        return u + gs * (c - u)

    n = 9
    ref = _diffusers_loop(n, z, combined)
    ref64 = Ref64(n)
    x64 = z.double()
    for i, t in enumerate(_sched(n).timesteps):
        x64 = ref64.step(combined(x64, t.double()), i, x64)
    smp = IPNDMSampler(None, n)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = z.to(dev).contiguous(memory_format=layout)
        with fastdiff.use_backend(backend, op="unipc_step"):
            for i, t in enumerate(smp.timesteps):
                x = smp.step(raw(x.cpu(), t.expand(4)).to(dev), i, x, guidance_scale=gs)
        assert x.device.type == dev and x.is_contiguous(memory_format=layout)
        err = rel(x.cpu(), ref)
        assert 0.0 < err <= 2 * RTOL, f"{backend}: rel err {err:.2e}"
    half = _diffusers_loop(n, z.half(), combined)
    assert half.dtype == torch.float16
    x = z.half().to(dev)
    with fastdiff.use_backend(backend, op="unipc_step"):
        for i, t in enumerate(smp.timesteps):
            x = smp.step(raw(x.cpu(), t.expand(4)).to(dev), i, x, guidance_scale=gs)
    assert x.dtype == torch.float16
    assert_fa_rule(x.cpu(), x64, half, atol=1e-3, name=f"{backend} fp16")


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("mu,rate", [(0.7, 1.8), (0.0, 2.8)])
def test_gaussian_data_exact_model_converges(mu, rate):
    """With Gaussian data N(mu, tau^2) the exact v-model is known in closed form, and the
    probability-flow ODE from pure noise (alpha = 0) maps x_T to mu + tau x_T. iPNDM's end
    point approaches that map as the steps grow: diffusers' first step drops the model (x_1 =
    sigma_1 x_T, without alpha_1 mu), which keeps a mu != 0 run first order (error / 2 per
    doubling); with mu = 0 that step is second order and the error falls >= 2.8x per doubling
    (3.2-4.5x measured)."""
    tau = 0.5

    def exact_v(x, t):
        s = torch.sin(t.double() * math.pi / 2).reshape(-1, *([1] * (x.ndim - 1)))
        a = torch.cos(t.double() * math.pi / 2).reshape(-1, *([1] * (x.ndim - 1)))
        x0 = mu + a * tau**2 / (a * a * tau**2 + s * s) * (x - a * mu)
        eps = (x - a * x0) / s
        return (a * eps - s * x0).to(x.dtype)

    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    target = mu + tau * z
    errs = []
    for n in (10, 20, 40, 80):
        smp, x = IPNDMSampler(None, n), z.float()
        for i, t in enumerate(smp.timesteps):
            x = smp.step(exact_v(x.double(), t.expand(4)).float(), i, x)
        errs.append((x.double() - target).abs().max().item())
    ratios = [errs[k] / errs[k + 1] for k in range(3)]
    assert errs[-1] < 0.01 and all(r >= rate for r in ratios), (errs, ratios)


# ------------------------------------------------------------------------------ refusals
def test_refusals_name_the_argument():
    z = torch.randn(SHAPE)
    with pytest.raises(TypeError, match=r"schedule: the ipndm sampler takes no VP noise"):
        IPNDMSampler(NoiseSchedule("linear"), 5)
    with pytest.raises(ValueError, match=r"prediction_type: expected 'v_prediction'.*'epsilon'"):
        IPNDMSampler(None, 5, prediction_type="epsilon")
    with pytest.raises(ValueError, match=r"steps: expected an int >= 1, got 0"):
        IPNDMSampler(None, 0)
    with pytest.raises(TypeError, match=r"steps: expected an int, got bool"):
        IPNDMSampler(None, True)
    with pytest.raises(ValueError, match=r"trained_betas=.*'ipndm' sampler does not implement"):
        fastdiff.sample(vtoy, steps=5, noise=z,
                        schedule=diffusers.IPNDMScheduler(trained_betas=[0.5] * 6))  # fmt: skip
    with pytest.raises(ValueError, match=r"sampler 'ipndm' needs None or diffusers' IPNDMSch"):
        fastdiff.sample(vtoy, steps=5, noise=z, sampler="ipndm",
                        schedule=diffusers.DDIMScheduler())  # fmt: skip
    with pytest.raises(ValueError, match=r"sampler 'ipndm' needs None.*got NoiseSchedule"):
        fastdiff.sample(vtoy, steps=5, noise=z, sampler="ipndm", schedule=NoiseSchedule("linear"))
    with pytest.raises(ValueError, match="eta"):
        fastdiff.sample(vtoy, steps=5, noise=z, sampler="ipndm", eta=0.5)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['order'\]"):
        fastdiff.sample(vtoy, steps=5, noise=z, sampler="ipndm", order=2)
    # another sampler on IPNDMScheduler: it has no betas to give it
    with pytest.raises(ValueError, match="IPNDMScheduler has no beta schedule"):
        fastdiff.sample(vtoy, steps=5, noise=z, sampler="ddim", schedule=diffusers.IPNDMScheduler())
    # img2img: a strength that leaves no step of the grid
    with pytest.raises(ValueError, match=r"strength: 0.1 leaves no step of the 5-step grid"):
        fastdiff.sample(vtoy, steps=5, sampler="ipndm", image=z, strength=0.1)
    assert SAMPLERS["ipndm"] is IPNDMSampler
    assert isinstance(make_sampler("ipndm", None, 4), IPNDMSampler)


# ------------------------------------------------------------------------ img2img, inpainting
def _start(sch, s: int, image: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The image noised to level s as an img2img pipeline would with IPNDMScheduler (it has no
    add_noise): x_s = alpha_s x_0 + sigma_s z, the forward process its step uses (its sigma is
    stored as ``betas``)."""
    return sch.alphas[s] * image + sch.betas[s] * z


def _diffusers_img2img(n, strength, image, z, mask=None):
    """StableDiffusion(Inpaint)Pipeline's loop with IPNDMScheduler: get_timesteps,
    set_begin_index, the start (pure noise at strength 1, as is_strength_max), the steps, and
    with a mask (1 = repaint) the known region replaced after each step by the image noised to
    the next level (the image itself after the last)."""
    sch = _sched(n)
    s = n - min(int(n * strength), n)
    sch.set_begin_index(s)
    timesteps = sch.timesteps[s:]
    x = z * sch.init_noise_sigma if (mask is not None and strength == 1.0) else _start(
        sch, s, image, z)  # fmt: skip
    for k, t in enumerate(timesteps):
        x = sch.step(vtoy(x, t.expand(x.shape[0])), t, x).prev_sample
        if mask is not None:
            known = _start(sch, s + k + 1, image, z) if k < len(timesteps) - 1 else image
            x = (1 - mask) * known + mask * x
    return x


def _image(seed: int) -> torch.Tensor:
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("n", [5, 12])
@pytest.mark.parametrize("strength", [1.0, 0.8, 0.5, 0.3])
def test_img2img_is_the_begin_index_loop(n, strength):
    """sample(image=, strength=) vs diffusers' scheduler from set_begin_index(s) on the image
    noised by x_s = alpha_s x_0 + sigma_s z (and the float64 restatement from that start)."""
    image, z = _image(1), torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    want = _diffusers_img2img(n, strength, image, z)
    ours = fastdiff.sample(vtoy, n, sampler="ipndm", image=image, strength=strength, noise=z)
    assert rel(ours, want) <= 2 * RTOL
    s = n - int(n * strength)
    ref, sch = Ref64(n), _sched(n)
    x = _start(sch, s, image.double(), z.double())
    for i in range(s, n):
        x = ref.step(vtoy(x, sch.timesteps[i].double().expand(2)), i, x)
    assert rel(ours, x) <= RTOL
    # the start itself: sampler.add_noise at call s; strength 1 is the plain run from z
    smp = IPNDMSampler(None, n)
    torch.testing.assert_close(smp.add_noise(image, z, s), _start(sch, s, image, z))
    if strength == 1.0:
        assert torch.equal(ours, fastdiff.sample(vtoy, n, sampler="ipndm", noise=z))
    else:  # the image shows through: not the plain run
        assert rel(ours, fastdiff.sample(vtoy, n, sampler="ipndm", noise=z)) > 1e-2


def test_img2img_callback_trajectory_and_default_strength():
    """The run's calls are the last int(N strength) of the grid (callback i from 0, diffusers'
    timesteps[s:]); strength None is the default 0.8."""
    n, image = 10, _image(3)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    seen = []
    out, traj = fastdiff.sample(vtoy, n, sampler="ipndm", image=image, strength=0.5, noise=z,
                                callback=lambda i, t, x: seen.append((i, t)),
                                return_trajectory=True)  # fmt: skip
    sch = _sched(n)
    assert [i for i, _ in seen] == list(range(5))
    assert torch.equal(traj["timesteps"], sch.timesteps[5:])
    torch.testing.assert_close(traj["x"][0], _start(sch, 5, image, z))
    assert torch.equal(traj["x"][-1], out)
    default = fastdiff.sample(vtoy, n, sampler="ipndm", image=image, noise=z)
    assert torch.equal(default, fastdiff.sample(vtoy, n, sampler="ipndm", image=image,
                                                strength=0.8, noise=z))  # fmt: skip


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("soft", [False, True])
def test_inpainting_is_the_inpaint_pipeline_loop(strength, soft):
    n, image = 8, _image(5)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(1, 1, *SHAPE[2:])
    mask[..., 1:4, 1:4] = 1.0
    if soft:
        mask = mask * 0.7 + 0.1
    want = _diffusers_img2img(n, strength, image, z, mask)
    ours = fastdiff.sample(vtoy, n, sampler="ipndm", image=image, mask=mask, strength=strength,
                           noise=z)  # fmt: skip
    assert rel(ours, want) <= 2 * RTOL
    keep = (mask == 0).expand(SHAPE)
    if not soft:
        assert torch.equal(ours[keep], image[keep])  # the kept region is the image exactly
        assert (ours[~keep] - image[~keep]).abs().max() > 1e-2


@torch.no_grad()
def test_cuda_graph_img2img_and_inpainting_equal_eager(fake_cuda_graphs, monkeypatch):
    """The graphed loop (faked on CPU) of runs from call s: the warm-up rows of run_row, the
    history buffers zeroed by load, the blend in the captured step."""
    from fastdiff import api

    eager_loop = api._sample_eager
    image = _image(7)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    mask = torch.zeros(1, 1, *SHAPE[2:])
    mask[..., 2:5, :] = 1.0

    def run(graphed, **kw):
        monkeypatch.setattr(api, "_sample_eager", api._sample_graphed if graphed else eager_loop)
        return fastdiff.sample(vtoy, 9, sampler="ipndm", image=image, noise=z,
                               return_trajectory=True, **kw)  # fmt: skip

    for kw in ({"strength": 0.55}, {"strength": 1.0}, {"strength": 0.75},
               {"strength": 0.6, "mask": mask}):  # fmt: skip
        eager, etraj = run(False, **kw)
        out, traj = run(True, **kw)
        torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traj["x"], etraj["x"], rtol=1e-6, atol=1e-6)
    assert len(fake_cuda_graphs) == 2  # img2img: one capture from any start; inpainting: its own
