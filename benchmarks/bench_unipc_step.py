"""Fused UniPC step (``unipc_step``: UniC corrector + UniP-2 predictor in one pass) vs the eager
step as diffusers' ``UniPCMultistepScheduler`` writes it (convert_model_output, then
multistep_uni_c_bh_update and multistep_uni_p_bh_update: ~20 tensor ops, torch.stack / einsum for
the D1s terms).

Group ``unipc_step order2 <shape> fp32``, variants "eager" (the baseline), "fused" (what the
dispatch picks), "fused-triton" and "fused-cuda" on GPU. Bytes: read x, eps, last, m_{i-1},
m_{i-2}; write x_c, m_i, x_next. The coefficients are a real UniPC row (bh2, 20 steps, step 5:
corrector and predictor both of order 2); the eager step uses the same scalars.
"""

import math

import pytest
import torch
from benchutil import bench

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.ops.unipc_step import unipc_step
from fastdiff.samplers import UniPCSampler

SHAPES = [(16, 3, 64, 64), (4, 4, 64, 64)]
GPU_SHAPES = SHAPES + [(16, 3, 256, 256)]
# scalars of one step (alpha, sigma of s0 and t; h; r1 = h_prev / h; rho_c for UniC-2)
A_S, S_S, A_T, S_T, H, R1, RHO = 0.7, math.sqrt(0.51), 0.8, 0.6, 0.4, 1.25, (0.4, 0.3)


def eager_unipc(x, eps, last, m1, m2):
    """diffusers' step: x0 from eps, UniC-2 on ``last``, then UniP-2 from the corrected x."""
    m0 = (x - S_S * eps) / A_S  # convert_model_output (epsilon, predict_x0)
    hh = -H
    h_phi_1 = torch.expm1(torch.tensor(hh)).item()
    b_h = h_phi_1  # bh2
    rhos_c = torch.tensor(RHO, device=x.device, dtype=x.dtype)
    # UniC: m1 is the previous model output (diffusers' model_output_list[-1]), m2 the one before
    d1s = torch.stack([(m2 - m1) / R1], dim=1)
    corr_res = torch.einsum("k,bkc...->bc...", rhos_c[:-1], d1s)
    d1_t = m0 - m1
    x_t_ = (S_T / S_S) * last - A_T * h_phi_1 * m1
    x_c = x_t_ - A_T * b_h * (corr_res + rhos_c[-1] * d1_t)
    # UniP-2 from x_c, with m0 (new) and m1
    d1s = torch.stack([(m1 - m0) / R1], dim=1)
    pred_res = torch.einsum("k,bkc...->bc...", torch.tensor([0.5], device=x.device), d1s)
    x_t_ = (S_T / S_S) * x_c - A_T * h_phi_1 * m0
    return x_c, m0, x_t_ - A_T * b_h * pred_res


def _coef(device):
    smp = UniPCSampler(NoiseSchedule("linear"), 20)
    return smp.coef_table(device)[5].clone()


def _variants(device):
    out = [("eager", None), ("fused", None)]
    if device.startswith("cuda"):
        for backend in ("triton", "cuda"):
            if fastdiff.backend_available(backend, device)[0]:
                out.append((f"fused-{backend}", backend))
    return out


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["eager", "fused", "fused-triton", "fused-cuda"])
def test_unipc_step(benchmark, device, shape, variant):
    if shape not in (GPU_SHAPES if device.startswith("cuda") else SHAPES):
        pytest.skip("GPU-only shape")
    backends = dict(_variants(device))
    if variant not in backends:
        pytest.skip(f"{variant} not available on {device}")
    backend = backends[variant]
    coef = _coef(device)

    def make():
        return tuple(torch.randn(shape, device=device) for _ in range(5))

    def fused(x, e, last, m1, m2):
        if backend is None:
            return unipc_step(x, e, coef, last, m1, m2)
        with fastdiff.use_backend(backend, "unipc_step"):
            return unipc_step(x, e, coef, last, m1, m2)

    fn = eager_unipc if variant == "eager" else fused
    bench(benchmark, fn, make, group=f"unipc_step order2 {tuple(shape)} fp32", variant=variant,
          bytes=8 * math.prod(shape) * 4, device=device)  # fmt: skip
