"""Flow-matching inversion: the rectified-flow ODE run upwards, x_0 -> x_1 (sigma 0 -> 1).

The inverse of :class:`~fastdiff.samplers.FlowMatchEulerSampler`: explicit Euler steps of the
velocity ODE dx / dsigma = v(x, sigma) (Liu et al. 2022, arXiv:2209.03003) on the same sigma
grid read from 0 upwards, so that ``sample(noise=x_1, sampler="flow_euler")`` with the same
settings maps the result back to the image up to both runs' first-order discretisation error.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastdiff.samplers.flow import FlowMatchEulerSampler

__all__ = ["FlowMatchEulerInverseSampler"]


class FlowMatchEulerInverseSampler(FlowMatchEulerSampler):
    """Flow-matching inversion: :class:`~fastdiff.samplers.FlowMatchEulerSampler`'s grid
    reversed, explicit Euler from sigma = 0 (the image) up to the grid's top sigma (1 by
    default).

    With the forward grid ``1 >= sigma_0 > ... > sigma_{N-1} > 0`` (shift, dynamic shifting
    with ``mu``, custom ``sigmas``, Karras / exponential / beta grids, ``shift_terminal``: all
    as ``"flow_euler"`` builds them), the inversion runs over ``u = [0, sigma_{N-1}, ...,
    sigma_0]``; step i calls the model at the *lower* level u_i (timestep u_i T, so the first
    call is at t = 0) and moves up::

        x_{i+1} = x_i + (u_{i+1} - u_i) v(x_i, u_i T)

    This is explicit Euler on the ODE itself (first order, a consistent solver), the choice of
    the RF-Inversion / FlowEdit style inversions: the velocity is read where x is. DDIM
    inversion (:class:`~fastdiff.samplers.DDIMInverseSampler`) instead calls at the upper
    timestep, reusing the forward sampler's call points; with a flow model that would read
    v(x_{u_i}, u_{i+1}) off the trajectory and is no more accurate. The forward sampler's
    calls at sigma_{N-1} .. sigma_0 and the inversion's at 0 .. sigma_1 differ only by the
    grid's ends; both errors are O(1 / N).

    A step is one fused ``sampler_step`` call with the velocity in the op's epsilon slot and
    the float64 row ``[1, u_i, 0, u_{i+1} - u_i, 1, 0, 0, 0]`` (``"flow_euler"``'s row on the
    reversed grid). Deterministic: no ``stochastic_sampling``, no img2img ``strength``
    (``inverts``: ``sample(image=...)`` refuses it).

    Args:
        schedule: must be None.
        steps: number of Euler steps (model calls).
        num_train_timesteps, shift, use_dynamic_shifting, base_shift, max_shift,
            base_image_seq_len, max_image_seq_len, invert_sigmas, shift_terminal,
            time_shift_type, use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, mu,
            image_seq_len, sigmas: the forward grid's settings, as
            :class:`~fastdiff.samplers.FlowMatchEulerSampler` (``sigmas`` in the forward
            sampler's descending order).
    """

    name = "flow_euler_inverse"
    inverts = True
    strength_option = False

    def __init__(
        self,
        schedule: None = None,
        steps: int = 50,
        *,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        mu: float | None = None,
        image_seq_len: int | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        super().__init__(
            schedule,
            steps,
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            invert_sigmas=invert_sigmas,
            shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            time_shift_type=time_shift_type,
            mu=mu,
            image_seq_len=image_seq_len,
            sigmas=sigmas,
        )
        #: float64 ``[steps + 1]``: the forward grid reversed, 0 first, ascending
        self.sigmas = self.sigmas[::-1].copy()
        # the model's timesteps u_i T (ascending, the first is 0), the rows (no noise) of it
        self._set_tables()

    @property
    def top_sigma(self) -> float:
        """The noise level the inversion ends at (the forward run's first, 1 by default)."""
        return float(self.sigmas[-1])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, shift={self.shift}, mu={self.mu}, "
            f"sigma_grid={self.sigma_grid!r})"
        )
