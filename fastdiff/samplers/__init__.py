"""Samplers: DDPM, DDIM, DEIS, DPM-Solver++ 2M, Euler, Euler ancestral, Heun, DPM2, DPM2 a, UniPC,
PLMS, iPNDM, LMS, LCM, TCD, consistency models, flow-matching Euler and Heun, EDM Euler and
DPM-Solver++, Stable Audio's cosine SDE-DPM-Solver++, SA-Solver (one fused op call per model
call); DDIM, DPM-Solver++ and flow-matching inversion (``DDIMInverseSampler``,
``DPMSolverPPInverseSampler``, ``FlowMatchEulerInverseSampler``: x_0 -> x_T, their timesteps
ascending).

Every sampler is built as ``Sampler(schedule, steps, **options)``, exposes ``.timesteps`` (the
model timesteps, int64, descending; ascending for the inversions) and ``.step(model_output, i,
x, noise=None) -> x_prev`` with ``i`` the step index, so each step can be compared with the
matching diffusers scheduler.

    >>> from fastdiff import NoiseSchedule
    >>> from fastdiff.samplers import DDIMSampler
    >>> sampler = DDIMSampler(NoiseSchedule("linear"), 50, eta=0.0)
    >>> sampler.timesteps[:3]
    tensor([980, 960, 940])
"""

from __future__ import annotations

from typing import Any

from fastdiff.samplers.base import Sampler, spaced_timesteps
from fastdiff.samplers.consistency import ConsistencyModelSampler
from fastdiff.samplers.cosine_dpm import CosineDPMSolverSampler
from fastdiff.samplers.ddim import DDIMSampler
from fastdiff.samplers.ddim_inverse import DDIMInverseSampler
from fastdiff.samplers.ddpm import DDPMSampler
from fastdiff.samplers.deis import DEISSampler
from fastdiff.samplers.dpm_inverse import DPMSolverPPInverseSampler
from fastdiff.samplers.dpm_sde import DPMSolverSDESampler
from fastdiff.samplers.dpm_single import DPMSolverSinglestepSampler
from fastdiff.samplers.dpm_solver import DPMSolverPPSampler
from fastdiff.samplers.edm import EDMDPMSolverSampler, EDMEulerSampler
from fastdiff.samplers.euler import EulerSampler
from fastdiff.samplers.euler_ancestral import EulerAncestralSampler
from fastdiff.samplers.flow import FlowMatchEulerSampler, FlowMatchHeunSampler
from fastdiff.samplers.flow_inverse import FlowMatchEulerInverseSampler
from fastdiff.samplers.heun import HeunSampler
from fastdiff.samplers.ipndm import IPNDMSampler
from fastdiff.samplers.kdpm2 import DPM2AncestralSampler, DPM2Sampler
from fastdiff.samplers.lcm import LCMSampler, TCDSampler
from fastdiff.samplers.lms import LMSSampler
from fastdiff.samplers.pndm import PNDMSampler
from fastdiff.samplers.sa_solver import SASolverSampler
from fastdiff.samplers.unipc import UniPCSampler
from fastdiff.schedules import NoiseSchedule

__all__ = [
    "SAMPLERS",
    "ConsistencyModelSampler",
    "CosineDPMSolverSampler",
    "DDIMInverseSampler",
    "DDIMSampler",
    "DDPMSampler",
    "DEISSampler",
    "DPM2AncestralSampler",
    "DPM2Sampler",
    "DPMSolverPPInverseSampler",
    "DPMSolverPPSampler",
    "DPMSolverSDESampler",
    "DPMSolverSinglestepSampler",
    "EDMDPMSolverSampler",
    "EDMEulerSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "FlowMatchEulerInverseSampler",
    "FlowMatchEulerSampler",
    "FlowMatchHeunSampler",
    "HeunSampler",
    "IPNDMSampler",
    "LCMSampler",
    "LMSSampler",
    "PNDMSampler",
    "SASolverSampler",
    "Sampler",
    "TCDSampler",
    "UniPCSampler",
    "make_sampler",
    "spaced_timesteps",
]

#: Names accepted by :func:`make_sampler` and ``fastdiff.sample(sampler=...)``.
SAMPLERS: dict[str, type[Sampler]] = {
    "cm": ConsistencyModelSampler,
    "consistency": ConsistencyModelSampler,
    "cosine_dpm++": CosineDPMSolverSampler,
    "ddim": DDIMSampler,
    "ddim_inverse": DDIMInverseSampler,
    "ddpm": DDPMSampler,
    "deis": DEISSampler,
    "dpm++": DPMSolverPPSampler,
    "dpmsolver++": DPMSolverPPSampler,
    "dpm-solver++": DPMSolverPPSampler,
    "dpm++_inverse": DPMSolverPPInverseSampler,
    "dpm++_single": DPMSolverSinglestepSampler,
    "dpm++_sde": DPMSolverSDESampler,
    "dpm2": DPM2Sampler,
    "dpm2_a": DPM2AncestralSampler,
    "edm_dpm++": EDMDPMSolverSampler,
    "edm_euler": EDMEulerSampler,
    "euler": EulerSampler,
    "euler_a": EulerAncestralSampler,
    "flow_euler": FlowMatchEulerSampler,
    "flow_euler_inverse": FlowMatchEulerInverseSampler,
    "flow_heun": FlowMatchHeunSampler,
    "heun": HeunSampler,
    "ipndm": IPNDMSampler,
    "lcm": LCMSampler,
    "lms": LMSSampler,
    "pndm": PNDMSampler,
    "plms": PNDMSampler,
    "sa_solver": SASolverSampler,
    "tcd": TCDSampler,
    "unipc": UniPCSampler,
}


def make_sampler(name: str, schedule: NoiseSchedule, steps: int, **options: Any) -> Sampler:
    """Build the sampler called ``name`` ("cm" (alias "consistency": multistep consistency sampling;
    ``schedule`` must be None), "cosine_dpm++" (Stable Audio's SDE-DPM-Solver++; ``schedule``
    must be None), "ddim", "ddim_inverse" (DDIM inversion, x_0 -> x_T), "ddpm", "deis", "dpm++",
    "dpm++_inverse" (DPM-Solver++ inversion, x_0 -> x_T), "dpm2", "dpm2_a", "edm_dpm++",
    "edm_euler" (EDM-preconditioned models; ``schedule`` must be None), "euler", "euler_a",
    "flow_euler", "flow_heun" (rectified flow; ``schedule`` must be None), "flow_euler_inverse"
    (flow-matching inversion, x_0 -> x_1), "heun", "ipndm" (iPNDM, v-prediction models of
    continuous time; ``schedule`` must be None), "lcm", "lms", "pndm", "plms" (PNDM with
    ``skip_prk_steps=True``), "sa_solver" (SA-Solver's stochastic Adams predictor-corrector),
    "tcd", "unipc")."""
    if not isinstance(name, str) or name.lower() not in SAMPLERS:
        raise ValueError(
            f"sampler: expected one of {sorted(set(SAMPLERS) - {'dpmsolver++', 'dpm-solver++'})} "
            f"or a Sampler object, got {name!r}"
        )
    if name.lower() == "plms":  # PLMS without the Runge-Kutta warm-up unless asked for
        options.setdefault("skip_prk_steps", True)
    return SAMPLERS[name.lower()](schedule, steps, **options)
