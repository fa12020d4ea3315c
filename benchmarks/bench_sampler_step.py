"""Fused DDIM step vs the eager diffusers-style step (CPU fp32 target: >= 4x eager).

Groups (variant "eager" is the baseline of each):
* ``sampler_step ddim-eta1 <shape> fp32``: eta=1 with clipping; eager draws ``torch.randn``, the
  fused step draws in-kernel Philox noise (4 normals per counter); "fused-randn" is the fused step
  reading a ``torch.randn`` tensor; "fused-triton" and "fused-cuda" on GPU ("fused" is what the
  dispatch picks).
* ``sampler_step ddim-eta0 <shape> fp32``: the deterministic step (no RNG): the fusion win alone.
* ``dpm_solver_2m_step 2m <shape> fp32``: the DPM-Solver++(2M) multistep update (eps model output,
  previous x0 read back) against diffusers' eager midpoint update.
* ``dpm_solver_2m_step 2m-sde <shape> fp32``: DPM++ 2M SDE (``algorithm_type="sde-dpmsolver++"``):
  eager draws ``torch.randn``, "fused" draws in-kernel Philox noise, "fused-randn" reads a
  ``torch.randn`` tensor.

Shapes: (16, 3, 64, 64) and (4, 4, 64, 64) everywhere, plus (16, 3, 256, 256) on GPU.
"""

import math

import pytest
import torch
from benchutil import bench

import fastdiff
from fastdiff.ops.sampler_step import dpm_solver_2m_step, sampler_step

CPU_SHAPES = [(16, 3, 64, 64), (4, 4, 64, 64)]
GPU_SHAPES = CPU_SHAPES + [(16, 3, 256, 256)]
AB, AB_PREV = 0.5, 0.6  # alphabar_t, alphabar_prev


def eager_ddim(x, eps, alphas_cumprod, t, t_prev):
    """DDIMScheduler.step as diffusers writes it (eta=1, clip_sample, fresh randn noise)."""
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[t_prev]
    beta_prod_t = 1 - alpha_prod_t
    pred_x0 = (x - beta_prod_t**0.5 * eps) / alpha_prod_t**0.5
    pred_x0 = pred_x0.clamp(-1.0, 1.0)
    variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    std = 1.0 * variance**0.5
    pred_dir = (1 - alpha_prod_t_prev - std**2) ** 0.5 * eps
    prev = alpha_prod_t_prev**0.5 * pred_x0 + pred_dir
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    return prev + std * noise


def ddim_coef(device):
    var = (1 - AB_PREV) / (1 - AB) * (1 - AB / AB_PREV)
    vals = [math.sqrt(AB), math.sqrt(1 - AB), math.sqrt(AB_PREV),
            math.sqrt(1 - AB_PREV - var), 0.0, math.sqrt(var), 0.0, 0.0]  # fmt: skip
    return torch.tensor(vals, dtype=torch.float64).float().to(device)


def _shapes(device):
    return GPU_SHAPES if device.startswith("cuda") else CPU_SHAPES


def _variants(device):
    # fused-randn: torch.randn noise (torch's generator) + the fused step reading it
    out = [("eager", None), ("fused", None), ("fused-randn", None)]
    if device.startswith("cuda"):
        for backend in ("triton", "cuda"):
            if fastdiff.backend_available(backend, device)[0]:
                out.append((f"fused-{backend}", backend))
    return out


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["eager", "fused", "fused-triton", "fused-cuda", "fused-randn"])
def test_ddim_step(benchmark, device, shape, variant):
    if shape not in _shapes(device):
        pytest.skip("GPU-only shape")
    backends = dict(_variants(device))
    if variant not in backends:
        pytest.skip(f"{variant} not available on {device}")
    numel = math.prod(shape)
    group = f"sampler_step ddim-eta1 {tuple(shape)} fp32"
    nbytes = 3 * numel * 4  # read x, read eps, write x_prev

    if variant == "eager":
        ac = torch.tensor([AB, AB_PREV], device=device)

        def make():
            return (torch.randn(shape, device=device), torch.randn(shape, device=device), ac)

        bench(benchmark, lambda x, e, a: eager_ddim(x, e, a, 0, 1), make, group=group,
              variant=variant, bytes=nbytes, device=device)  # fmt: skip
        return
    coef = ddim_coef(device)
    gs = torch.tensor([1234, 0], device=device)
    backend = backends[variant]

    def make():
        return torch.randn(shape, device=device), torch.randn(shape, device=device)

    def fused(x, e):
        if variant == "fused-randn":
            z = torch.randn(x.shape, device=x.device, dtype=x.dtype)
            return sampler_step(x, e, coef, clip_range=1.0, noise=z)
        if backend is None:
            return sampler_step(x, e, coef, clip_range=1.0, generator_state=gs)
        with fastdiff.use_backend(backend, "sampler_step"):
            return sampler_step(x, e, coef, clip_range=1.0, generator_state=gs)

    bench(benchmark, fused, make, group=group, variant=variant, bytes=nbytes, device=device)


def eager_ddim_eta0(x, eps, alphas_cumprod, t, t_prev):
    """Deterministic DDIM step (eta=0) as diffusers writes it: the fusion win without RNG."""
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[t_prev]
    beta_prod_t = 1 - alpha_prod_t
    pred_x0 = (x - beta_prod_t**0.5 * eps) / alpha_prod_t**0.5
    pred_x0 = pred_x0.clamp(-1.0, 1.0)
    pred_dir = (1 - alpha_prod_t_prev) ** 0.5 * eps
    return alpha_prod_t_prev**0.5 * pred_x0 + pred_dir


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["eager", "fused", "fused-triton", "fused-cuda"])
def test_ddim_step_eta0(benchmark, device, shape, variant):
    if shape not in _shapes(device):
        pytest.skip("GPU-only shape")
    backends = dict(_variants(device))
    if variant not in backends:
        pytest.skip(f"{variant} not available on {device}")
    numel = math.prod(shape)
    ac = torch.tensor([AB, AB_PREV], device=device)
    coef = torch.tensor([math.sqrt(AB), math.sqrt(1 - AB), math.sqrt(AB_PREV),
                         math.sqrt(1 - AB_PREV), 0, 0, 0, 0], device=device)  # fmt: skip
    backend = backends[variant]

    def make():
        return torch.randn(shape, device=device), torch.randn(shape, device=device)

    def fused(x, e):
        if backend is None:
            return sampler_step(x, e, coef, clip_range=1.0)
        with fastdiff.use_backend(backend, "sampler_step"):
            return sampler_step(x, e, coef, clip_range=1.0)

    fn = (lambda x, e: eager_ddim_eta0(x, e, ac, 0, 1)) if variant == "eager" else fused
    bench(benchmark, fn, make, group=f"sampler_step ddim-eta0 {tuple(shape)} fp32",
          variant=variant, bytes=3 * numel * 4, device=device)  # fmt: skip


# DPM-Solver++ 2M step from lambda_s0 to lambda_t (alpha, sigma of t, s0; previous step's h_0)
A_T, S_T, A_S, S_S, H, H0 = 0.8, 0.6, 0.7, math.sqrt(0.51), 0.4, 0.5


def eager_dpm_2m(x, eps, x0_prev, sde: bool):
    """diffusers' convert_model_output + multistep_dpm_solver_second_order_update (midpoint),
    ODE or SDE (fresh torch.randn noise) as it writes them."""
    x0 = (x - S_S * eps) / A_S
    d1 = (1.0 / (H0 / H)) * (x0 - x0_prev)
    if not sde:
        e = math.exp(-H) - 1.0
        return (S_T / S_S) * x - (A_T * e) * x0 - 0.5 * (A_T * e) * d1
    e2 = 1.0 - math.exp(-2.0 * H)
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    return ((S_T / S_S * math.exp(-H)) * x + (A_T * e2) * x0 + 0.5 * (A_T * e2) * d1
            + S_T * math.sqrt(e2) * noise)  # fmt: skip


def dpm_coef(device, sde: bool):
    r = H0 / H
    if sde:
        e2 = 1.0 - math.exp(-2.0 * H)
        phi, c_x, c_noise = A_T * e2, S_T / S_S * math.exp(-H), S_T * math.sqrt(e2)
    else:
        phi, c_x, c_noise = A_T * (1.0 - math.exp(-H)), S_T / S_S, 0.0
    vals = [A_S, S_S, c_x, phi * (1 + 0.5 / r), -phi * 0.5 / r, c_noise, 0.0, 0.0]
    return torch.tensor(vals, dtype=torch.float64).float().to(device)


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["2m", "2m-sde"])
@pytest.mark.parametrize("variant", ["eager", "fused", "fused-triton", "fused-cuda", "fused-randn"])
def test_dpm_2m_step(benchmark, device, shape, kind, variant):
    if shape not in _shapes(device):
        pytest.skip("GPU-only shape")
    backends = dict(_variants(device))
    if variant not in backends or (variant == "fused-randn" and kind == "2m"):
        pytest.skip(f"{variant} not available on {device} for {kind}")
    sde = kind == "2m-sde"
    numel = math.prod(shape)
    group = f"dpm_solver_2m_step {kind} {tuple(shape)} fp32"
    nbytes = 5 * numel * 4  # read x, eps, x0_prev; write x_next, x0

    def make():
        return tuple(torch.randn(shape, device=device) for _ in range(3))

    if variant == "eager":
        bench(benchmark, lambda x, e, p: eager_dpm_2m(x, e, p, sde), make, group=group,
              variant=variant, bytes=nbytes, device=device)  # fmt: skip
        return
    coef = dpm_coef(device, sde)
    gs = torch.tensor([1234, 0], device=device)
    backend = backends[variant]

    def fused(x, e, p):
        kw = {}
        if variant == "fused-randn":
            kw = {"noise": torch.randn(x.shape, device=x.device, dtype=x.dtype)}
        elif sde:
            kw = {"generator_state": gs}
        if backend is None:
            return dpm_solver_2m_step(x, e, coef, p, **kw)
        with fastdiff.use_backend(backend, "dpm_solver_2m_step"):
            return dpm_solver_2m_step(x, e, coef, p, **kw)

    bench(benchmark, fused, make, group=group, variant=variant, bytes=nbytes, device=device)
