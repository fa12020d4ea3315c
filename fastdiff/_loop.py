"""The reverse process of ``fastdiff.sample``: x_T -> x_0, one model call and one fused update
per step (Ho et al. 2020, Algorithm 2, with the step of the chosen sampler).

With classifier-free guidance (Ho & Salimans 2022) the model sees the batch ``[x, x]`` with the
``[uncond, cond]`` conditioning, and the sampler op combines the two output halves itself.
Every per-step scalar lives in the sampler's device-resident coefficient table, so the loop
never synchronises with the device. The CUDA-graph version of this loop is in
:mod:`fastdiff._graph`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fastdiff._conditioning import _prepare_output, _rescaled_guidance, _unwrap
from fastdiff.samplers import Sampler


def _sample_eager(model, smp, x, kwargs, gs, generator, progress, callback, return_trajectory,
                  rescale=0.0, start=0, inpaint=None):  # fmt: skip
    """x_T -> x_0: for each step i, ``out = model(x, t_i)`` and ``x = smp.step(out, i, x)``.

    ``start`` > 0 (img2img): x is the state at model call ``start`` and the calls ``start ..
    steps - 1`` run (the sampler warms up again, as diffusers after ``set_begin_index``); the
    callback's i and the trajectory count the calls run.

    ``gs`` is the guidance scale (None: no guidance), ``rescale`` the guidance rescale phi (0:
    the op combines the halves; else :func:`_rescaled_guidance` does, before the op); the noise
    of a stochastic step comes from
    ``generator``, else from the in-kernel Philox generator. ``inpaint``
    (:class:`fastdiff._inpaint.Inpaint`) blends the known region into x after every call (the
    callback and the trajectory's x rows see the blended x; its x0 rows are the steps' own).
    Returns x_0, and with ``return_trajectory`` also ``{"timesteps", "x", "x0"}``."""
    n = x.shape[0]
    dev = x.device
    rows = 2 * n if gs is not None else n
    t_all = _timestep_rows(smp, rows, dev)  # [steps x B]
    smp.coef_table(dev)  # the coefficient rows' one host -> device copy, before the loop
    ts_host = smp.timesteps.tolist()
    smp.reset()
    gen_state = _philox_state(smp, generator, dev)
    skw = {"generator_state": gen_state} if gen_state is not None else {}
    traj_x, traj_x0 = ([x], []) if return_trajectory else (None, None)
    gs_op = None if rescale else gs  # the guidance the op applies
    for i in _progress(range(start, smp.steps), progress, smp.steps - start):
        x_in = torch.cat([x, x]) if gs is not None else x
        out = _prepare_output(_unwrap(model(x_in, t_all[i], **kwargs)), x, smp, gs, model)
        if rescale:
            out = _rescaled_guidance(out, gs, rescale)
        noise = None
        if smp.needs_noise(i) and gen_state is None:
            noise = smp._draw_noise(x, generator)  # the sampler's dtype (SDE: fp32)
        res = smp.step(
            out, i, x, noise=noise, guidance_scale=gs_op, return_x0=return_trajectory, **skw
        )
        x, x0 = res if return_trajectory else (res, None)
        if inpaint is not None:  # the known region, noised to the next call's level
            x = inpaint.blend(x, inpaint.table[i])
        if return_trajectory:
            traj_x.append(x)
            traj_x0.append(x0)
        if callback is not None:
            callback(i - start, ts_host[i], x)
    if return_trajectory:
        return x, _trajectory(smp, traj_x, traj_x0, start)
    return x


def _timestep_rows(smp: Sampler, rows: int, device: torch.device) -> Tensor:
    """int64 ``[steps x rows]``: row i is step i's timestep for each row of the model's batch."""
    return smp.timesteps_on(device)[:, None].expand(smp.steps, rows).contiguous()


def _philox_state(smp: Sampler, generator: Any, device: torch.device) -> Tensor | None:
    """int64 ``[2]`` = (seed, 0) on ``device`` for in-kernel Philox noise, when the sampler adds
    noise and no generator was given (the seed comes from torch's default CPU generator, so
    ``torch.manual_seed`` makes runs reproducible; no device sync)."""
    if generator is not None or not any(smp.needs_noise(i) for i in range(smp.steps)):
        return None
    seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())  # not the default device
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


def _progress(it: Iterable[int], enabled: bool, total: int) -> Iterable[int]:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total)


def _trajectory(
    smp: Sampler, xs: list[Tensor], x0s: list[Tensor], start: int = 0
) -> dict[str, Tensor]:
    """The run's timesteps (from call ``start``), its x_t rows (before the first call and after
    each) and x0 rows."""
    return {"timesteps": smp.timesteps[start:], "x": torch.stack(xs), "x0": torch.stack(x0s)}
