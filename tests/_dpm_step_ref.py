"""The ``dpm_solver_2m_step`` op's math in plain torch and its test inputs, shared by
tests/test_dpm_sde.py (the noise operand, DPM++ 2M SDE) and tests/test_dpm3_op.py (the second
history operand, DPM++ 3M), tests/test_stage2_precision.py (the eps term) and
tests/test_dpm_hist_op.py (x0_prev3 / x0_prev4), and the dtypes of tests/test_sampler_step.py:
x_next = c_x x + c_x0 x0 + c_prev x0_prev +
c_prev2 x0_prev2 + c_prev3 x0_prev3 + c_prev4 x0_prev4 + c_noise z + c_eps eps with coef [a, s,
c_x, c_x0, c_prev, c_noise, c_prev2, c_eps, c_prev3, c_prev4]."""

from __future__ import annotations

import torch

import fastdiff
from fastdiff.ops.sampler_step import dpm_solver_2m_step

PREDS = ["epsilon", "v_prediction", "sample"]
SHAPE = (3, 3, 7, 5)  # odd sizes: scalar tails everywhere


def dtypes(case: tuple[str, str]) -> list[torch.dtype]:
    """The dtypes a backend case runs in."""
    interp = case == ("cpu", "triton")  # the Triton interpreter has no bf16 arithmetic
    return [torch.float32, torch.float16] + ([] if interp else [torch.bfloat16])


def reference(x, mo, p1, p2, z, pred, dt, g=None, clip=None, *, row, p3=None, p4=None):
    """The op's math in plain torch in ``dt`` with the fp32-rounded coefficients of ``row``; an
    absent operand (None) has no term; ``p3`` / ``p4``: x0_prev3 / x0_prev4. Returns (x_next,
    x0)."""
    c = [float(torch.tensor(v, dtype=torch.float32)) for v in row]
    a, s = c[0], c[1]
    xf, m = x.to(dt), mo.to(dt)
    if g is not None:
        n = x.shape[0]
        u, m = m[:n], m[n:]
        m = u + g * (m - u)
    if pred == "epsilon":
        x0, eps = (xf - s * m) / a, m
    elif pred == "v_prediction":
        x0, eps = a * xf - s * m, a * m + s * xf
    else:
        x0 = m
        eps = (xf - a * x0) / s
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
        eps = (xf - a * x0) / s  # the eps of the clipped x0
    out = c[2] * xf + c[3] * x0
    # the history operands x0_prev .. x0_prev4 (c_prev, c_prev2, c_prev3 = coef[8], c_prev4 =
    # coef[9]); a zero coefficient drops its term, as the kernels do
    for k, p in zip((4, 6, 8, 9), (p1, p2, p3, p4), strict=True):
        if p is not None and c[k] != 0:
            out = out + c[k] * p.to(dt)
    if z is not None:
        out = out + c[5] * z.to(dt)
    if len(c) > 7 and c[7] != 0:  # the eps term (absent for c_eps = 0)
        out = out + c[7] * eps
    return out, x0


def inputs(dev, dtype, shape=SHAPE, cfg=True, scale=1.0, history=2):
    """Fresh draws: x, the model output ([uncond, cond] halves with ``cfg``), ``history``
    history operands (x0_prev, x0_prev2, ...) and z; x and the model output times ``scale``.
    ``shape``: x's [N x C x H x W]."""
    n = shape[0]
    x = (torch.randn(shape, device=dev) * scale).to(dtype)
    mo = (torch.randn((2 * n if cfg else n, *shape[1:]), device=dev) * scale).to(dtype)
    rest = [torch.randn(shape, device=dev).to(dtype) for _ in range(history + 1)]
    return (x, mo, *rest)


def coef(dev, row) -> torch.Tensor:
    """The coefficient row as the op takes it: float32 on ``dev``."""
    return torch.tensor(row, dtype=torch.float32, device=dev)


def step(backend, *args, **kw):
    """dpm_solver_2m_step(*args, **kw) on ``backend``."""
    with fastdiff.use_backend(backend):
        return dpm_solver_2m_step(*args, **kw)


def layouts(dev, dtype):
    """(name, x): dense, channels_last, non-contiguous (sliced)."""
    big = torch.randn(4, 8, 6, 5, device=dev).to(dtype)
    cl = torch.randn(2, 4, 6, 5, device=dev).to(dtype).to(memory_format=torch.channels_last)
    return [
        ("dense", torch.randn(3, 3, 7, 5, device=dev).to(dtype)),
        ("channels_last", cl),
        ("sliced", big[::2, 1::2]),
    ]
