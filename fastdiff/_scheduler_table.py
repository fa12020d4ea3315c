"""The diffusers scheduler class each fastdiff sampler reproduces, and the settings of those
classes that it does not implement (data for :mod:`fastdiff._sampler_setup`)."""

from __future__ import annotations

from typing import Any

# The diffusers scheduler each sampler reproduces, and the settings of that scheduler that change
# its method (not its betas) which the sampler does not implement: {key: neutral value}. A
# non-neutral one there would be silently dropped, the samples no longer diffusers'.
_SCHEDULER_OF = {
    "cm": "CMStochasticIterativeScheduler",
    "cosine_dpm++": "CosineDPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "ddim_inverse": "DDIMInverseScheduler",
    "ddpm": "DDPMScheduler",
    "deis": "DEISMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++_inverse": "DPMSolverMultistepInverseScheduler",
    "dpm++_single": "DPMSolverSinglestepScheduler",
    "dpm++_sde": "DPMSolverSDEScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
    "dpm2_a": "KDPM2AncestralDiscreteScheduler",
    "edm_dpm++": "EDMDPMSolverMultistepScheduler",
    "edm_euler": "EDMEulerScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
    # after flow_euler: infer_sampler takes the first match, a scheduler samples forwards
    "flow_euler_inverse": "FlowMatchEulerDiscreteScheduler",
    "flow_heun": "FlowMatchHeunDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "ipndm": "IPNDMScheduler",
    "lcm": "LCMScheduler",
    "lms": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "sa_solver": "SASolverScheduler",
    "tcd": "TCDScheduler",
    "unipc": "UniPCMultistepScheduler",
}
# Samplers whose noise levels are their diffusers scheduler's own grid (no betas): built with
# schedule=None, from that scheduler's settings (as the EDM samplers)
_OWN_GRID = ("ipndm", "cosine_dpm++")
_SIGMAS_NEUTRAL = {"use_karras_sigmas": False, "use_exponential_sigmas": False,
                   "use_beta_sigmas": False}  # fmt: skip
_UNSUPPORTED_SETTINGS: dict[str, dict[str, Any]] = {
    # its flow grid (use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type) is
    # DPMSolverPPSampler's; flow combined with a sigma grid is refused by the sampler itself
    "dpm++": {
        **_SIGMAS_NEUTRAL,
        # not DPMSolverMultistepScheduler's, but its sigma grids read them from the config
        "sigma_min": None,
        "sigma_max": None,
    },
    # diffusers 0.42's DPMSolverSinglestepScheduler: its flow grid (use_flow_sigmas, flow_shift,
    # use_dynamic_shifting, time_shift_type) and lambda_min_clipped are the sampler's; its sigma
    # grids read a leftover sigma_min / sigma_max; thresholding with "dpmsolver" and flow + a VP
    # sigma grid are refused by the sampler itself
    "dpm++_single": {"sigma_min": None, "sigma_max": None},
    # diffusers 0.42's DPMSolverSDEScheduler: every setting it has is implemented (eta = 1 and
    # r = 1/2 are hard-coded there; noise_sampler_seed seeds its torchsde tree, which fastdiff
    # does not use: the law is the same, see dpm_sde.py); a leftover sigma_min / sigma_max is a
    # DPMSolverSDESampler option, read by its exponential / beta grids only, as diffusers'
    # diffusers 0.42's DPMSolverMultistepInverseScheduler: its sigma grids would read a leftover
    # sigma_min / sigma_max as their bottom / top (swapped: it builds them ascending); its flow
    # grid descends (it samples, not inverts); "sde-dpmsolver++" (NaN upwards) and the
    # "dpmsolver" types are refused by DPMSolverPPInverseSampler itself
    "dpm++_inverse": {"sigma_min": None, "sigma_max": None, "use_flow_sigmas": False},
    "euler": {
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    },
    # diffusers 0.42's EulerAncestralDiscreteScheduler has no method-changing setting fastdiff
    # lacks (its sigma grids are a fastdiff extension); these guard a future one (Euler's)
    "euler_a": {
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    },
    # diffusers 0.42's HeunDiscreteScheduler: every setting it has is implemented (it hard-codes
    # Karras' churn gamma = 0); these guard a future one (its Euler sibling's)
    "heun": {
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    },
    # diffusers 0.42's KDPM2 schedulers: every setting they have is implemented (gamma = 0 is
    # hard-coded there); these guard a future one (their Euler sibling's)
    "dpm2": {
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    },
    "dpm2_a": {
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    },
    # diffusers 0.42's IPNDMScheduler: trained_betas replaces its sin^2 noise levels
    "ipndm": {"trained_betas": None},
    # diffusers 0.42's SASolverScheduler: its flow grid (use_flow_sigmas, with flow_shift, which
    # acts only there) and learned-variance outputs are not implemented (predictor_order and
    # corrector_order 1-4 are)
    "sa_solver": {"use_flow_sigmas": False, "variance_type": None},
    # diffusers 0.42's LCMScheduler: every setting that changes its step is implemented
    # (timestep_spacing, steps_offset and set_alpha_to_one do nothing there); TCDScheduler's
    # step ignores its clip_sample, thresholding and timestep_scaling too, so not applying them
    # is diffusers' behaviour. Both guard a future sigma-grid setting.
    "lcm": {**_SIGMAS_NEUTRAL},
    "tcd": {**_SIGMAS_NEUTRAL},
    # diffusers 0.42's LMSDiscreteScheduler: every setting is implemented (a leftover
    # sigma_min / sigma_max of another scheduler's config is an LMSSampler option: its
    # exponential / beta grids read it, as diffusers')
    # diffusers 0.42's DEISMultistepScheduler: its flow grid (use_flow_sigmas, flow_shift,
    # use_dynamic_shifting, time_shift_type) is DEISSampler's; its Karras / exponential / beta
    # grids read a leftover sigma_min / sigma_max; another solver_order and flow + a VP sigma
    # grid are refused by DEISSampler itself
    "deis": {"sigma_min": None, "sigma_max": None},
    # diffusers' Karras / exponential / beta grids read a leftover sigma_min / sigma_max of
    # another scheduler's config; invert_sigmas is refused by FlowMatchEulerSampler itself
    "flow_euler": {"sigma_min": None, "sigma_max": None},
    "flow_euler_inverse": {"sigma_min": None, "sigma_max": None, "stochastic_sampling": False},
    # solver_order not in (1, 2, 3) and predict_x0=False are refused by UniPCSampler itself; its
    # flow grid (use_flow_sigmas, flow_shift, use_dynamic_shifting, time_shift_type,
    # shift_terminal) is UniPCSampler's
    "unipc": {
        "solver_p": None,
        "sigma_min": None,
        "sigma_max": None,
    },
}
