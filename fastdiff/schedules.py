"""Noise schedules of the discrete-time Gaussian diffusion process.

Notation follows DDPM (Ho et al., 2020, arXiv:2006.11239):

* forward step   q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)             (DDPM eq. 2)
* alpha_t = 1 - beta_t,  alpha_bar_t = prod_{s <= t} alpha_s
* closed form    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)         (DDPM eq. 4)
  i.e. x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,  eps ~ N(0, I).

Timesteps are 0-based (t = 0 .. T-1) as in diffusers: ``alphas_cumprod[t]`` is alpha_bar of the
(t+1)-th forward step. Every constant is held in float64; samplers turn them into fp32
coefficient tables once.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["NoiseSchedule", "BETA_SCHEDULES"]

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# (beta_start, beta_end) used when not given: DDPM's linear schedule; Stable Diffusion's
# scaled_linear schedule.
_DEFAULT_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of improved DDPM (Nichol & Dhariwal, 2021, arXiv:2102.09672, eq. 17).

    alpha_bar_t = f(t) / f(0),  f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2),  s = 0.008, for the
    paper's t = 0..T, and beta_t = min(1 - alpha_bar_t / alpha_bar_{t-1}, 0.999) (section 3.2:
    the clip prevents the singularity at t = T, where f(T) = 0 and beta_T would be 1).

    Returned 0-based: ``betas[i]`` is the paper's beta_{i+1}, so ``alphas_cumprod[i]`` is eq. 17's
    alpha_bar_{i+1} wherever no beta up to it was clipped; the clip makes the last one
    0.001 alpha_bar_{T-1} instead of f(T)/f(0) = 0 (as the paper's code and diffusers do).
    """

    def f(t_over_T: float) -> float:
        return math.cos((t_over_T + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    # alpha_bar_{i+1} / alpha_bar_i = f((i+1)/T) / f(i/T): the f(0) of eq. 17 cancels
    betas = [min(1.0 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas to zero terminal SNR (Lin et al., 2023, arXiv:2305.08891, Algorithm 1).

    sqrt(alpha_bar) is shifted so that its last value is 0 and scaled so that its first value is
    unchanged; betas are then recovered from the ratios of consecutive alpha_bar.
    """
    sqrt_ab = torch.cumprod(1.0 - betas.double(), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


_SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")


def _class_defaults(class_name: object) -> dict[str, Any]:
    """The schedule defaults of the diffusers scheduler class ``class_name`` ({} when unknown or
    diffusers is not installed): a saved config may omit keys left at their defaults."""
    if not isinstance(class_name, str) or not class_name.isidentifier():
        return {}
    try:
        import diffusers
    except ImportError:
        return {}
    cls = getattr(diffusers, class_name, None)
    if not isinstance(cls, type):
        return {}
    params = inspect.signature(cls.__init__).parameters
    return {
        k: params[k].default
        for k in _SCHEDULE_KEYS
        if k in params and params[k].default is not inspect.Parameter.empty
    }


class NoiseSchedule:
    """A discrete noise schedule beta_0..beta_{T-1} with its derived constants (float64).

    Args:
        beta_schedule: ``"linear"`` (DDPM: linspace(beta_start, beta_end, T)), ``"scaled_linear"``
            (Stable Diffusion: linspace(sqrt(beta_start), sqrt(beta_end), T)^2), ``"cosine"``
            (improved DDPM eq. 17; ``"squaredcos_cap_v2"`` is diffusers' name for it).
        num_train_timesteps: T, the number of forward steps the model was trained with.
        beta_start, beta_end: range of the linear schedules. Default (1e-4, 0.02) for ``linear``
            and (0.00085, 0.012) for ``scaled_linear``.
        betas: user-given betas (a sequence or tensor of length T); overrides ``beta_schedule``.
        rescale_betas_zero_snr: apply :func:`rescale_zero_terminal_snr`.

    Attributes (all float64 tensors of length T): ``betas``, ``alphas``, ``alphas_cumprod``,
    ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, ``log_snr`` (lambda_t =
    log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)), DPM-Solver's lambda_t = log(alpha_t /
    sigma_t), arXiv:2206.00927, whose alpha_t is sqrt(alpha_bar_t), not DDPM's 1 - beta_t).
    """

    def __init__(
        self,
        beta_schedule: str = "linear",
        *,
        num_train_timesteps: int = 1000,
        beta_start: float | None = None,
        beta_end: float | None = None,
        betas: Sequence[float] | torch.Tensor | None = None,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        if betas is not None:
            b = torch.as_tensor(betas, dtype=torch.float64, device="cpu").clone()
            if b.ndim > 1:
                raise ValueError(f"betas: expected a 1-D sequence, got shape {tuple(b.shape)}")
            b = b.reshape(-1).cpu()
            if b.numel() < 1:
                raise ValueError("betas: expected a non-empty sequence of betas, got an empty one")
            if not bool(((b > 0) & (b <= 1)).all()):
                raise ValueError("betas: every beta must lie in (0, 1]")
            num_train_timesteps = b.numel()
            beta_schedule = "custom"
        else:
            try:  # numpy ints too; bool is not a number of steps
                if isinstance(num_train_timesteps, bool):
                    raise TypeError
                T = operator.index(num_train_timesteps)
            except TypeError:
                T = -1
            if T < 1:
                raise ValueError(
                    f"num_train_timesteps: expected a positive int, got {num_train_timesteps!r}"
                )
            num_train_timesteps = T
            if beta_schedule in ("cosine", "squaredcos_cap_v2"):
                beta_schedule = "cosine"
                b = _cosine_betas(T)
            elif beta_schedule in _DEFAULT_RANGE:
                lo, hi = _DEFAULT_RANGE[beta_schedule]
                lo = lo if beta_start is None else float(beta_start)
                hi = hi if beta_end is None else float(beta_end)
                if not 0.0 < lo <= hi < 1.0:
                    raise ValueError(
                        f"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, got "
                        f"{lo} and {hi}"
                    )
                if beta_schedule == "linear":
                    b = torch.linspace(lo, hi, T, dtype=torch.float64, device="cpu")
                else:
                    b = torch.linspace(lo**0.5, hi**0.5, T, dtype=torch.float64, device="cpu") ** 2
                beta_start, beta_end = lo, hi
            else:
                raise ValueError(
                    f"beta_schedule: expected one of {list(BETA_SCHEDULES)} (or betas=...), "
                    f"got {beta_schedule!r}"
                )
        if rescale_betas_zero_snr:
            if b.numel() < 2:  # alpha_bar's first and last values coincide: 0/0
                raise ValueError(
                    "rescale_betas_zero_snr: needs at least 2 timesteps, got "
                    f"num_train_timesteps={b.numel()}"
                )
            b = rescale_zero_terminal_snr(b)
        self.beta_schedule = beta_schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.num_train_timesteps = int(num_train_timesteps)
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        self.betas = b
        self.alphas = 1.0 - b
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.log_snr = self.sqrt_alphas_cumprod.log() - self.sqrt_one_minus_alphas_cumprod.log()

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        extra = ", zero_snr" if self.rescale_betas_zero_snr else ""
        return (
            f"NoiseSchedule({self.beta_schedule!r}, T={self.num_train_timesteps}, "
            f"beta_start={self.beta_start}, beta_end={self.beta_end}{extra})"
        )

    @classmethod
    def from_diffusers(
        cls, scheduler_or_config: Any, *, _argname: str = "scheduler_or_config"
    ) -> NoiseSchedule:
        """Build the schedule of a diffusers scheduler (or its ``config`` dict).

        Reads ``num_train_timesteps``, ``beta_schedule``, ``beta_start``, ``beta_end``,
        ``trained_betas`` and ``rescale_betas_zero_snr``. A key missing from a config dict takes
        the default of the scheduler class its ``_class_name`` names (e.g. HeunDiscreteScheduler:
        beta_start 0.00085), else DDPM's (1e-4 .. 0.02 over 1000 steps). Errors name
        ``_argname`` (internal: ``fastdiff.sample`` passes ``"schedule"``, the argument its
        caller gave the scheduler as); a value the constructor refuses (``trained_betas`` out of
        (0, 1], ...) is reported as ``<_argname>: <the constructor's message>``.
        """
        arg = _argname
        if isinstance(scheduler_or_config, type):  # DDIMScheduler for DDIMScheduler()
            what = scheduler_or_config.__name__
            raise TypeError(
                f"{arg}: got the class {what}; pass an instance ({what}()) or its config dict"
            )
        cfg = getattr(scheduler_or_config, "config", scheduler_or_config)
        if not isinstance(cfg, Mapping):
            raise TypeError(
                f"{arg}: expected a diffusers scheduler or its config dict, "
                f"got {type(scheduler_or_config).__name__}"
            )
        name = type(scheduler_or_config).__name__
        defaults = _class_defaults(cfg.get("_class_name"))
        # flow matching, EDM, VE, and IPNDM (trained_betas=None, sin^2 of continuous time)
        if "beta_schedule" not in {**defaults, **cfg} and cfg.get("trained_betas") is None:
            raise ValueError(
                f"{arg}: {name} has no beta schedule (a flow-matching, EDM or "
                "variance-exploding scheduler?); fastdiff samples DDPM-family (beta) schedules"
            )
        for key, neutral in (("snr_shift_scale", 1.0), ("shift", 1.0)):
            if key in cfg and cfg[key] not in (None, neutral):
                raise ValueError(
                    f"{arg}: {name} sets {key}={cfg[key]}, which changes its noise "
                    "levels beyond the betas; fastdiff's NoiseSchedule does not model it"
                )
        cfg = {**defaults, **cfg}
        trained = cfg.get("trained_betas")
        kind = cfg.get("beta_schedule", "linear")
        if trained is None and kind not in BETA_SCHEDULES:
            raise ValueError(
                f"{arg}: beta_schedule {kind!r} is not supported; "
                f"expected one of {list(BETA_SCHEDULES)} or trained_betas"
            )
        nums = {}
        for key, default, conv in (("num_train_timesteps", 1000, int), ("beta_start", 1e-4, float),
                                   ("beta_end", 0.02, float)):  # fmt: skip
            v = cfg.get(key, default)
            try:
                nums[key] = conv(v)
            except (TypeError, ValueError):
                raise ValueError(f"{arg}: {key} must be a number, got {v!r}") from None
        try:
            return cls(
                kind,
                num_train_timesteps=nums["num_train_timesteps"],
                beta_start=nums["beta_start"],
                beta_end=nums["beta_end"],
                betas=trained,
                rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
            )
        except ValueError as e:
            raise ValueError(f"{arg}: {e}") from None

    # ------------------------------------------------------------------ per-timestep lookups
    def _gather(
        self, table: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor
    ) -> torch.Tensor:
        """table[t] broadcast to ``like`` ([N] -> [N x 1 x ... x 1]) in ``like``'s dtype/device."""
        t = torch.as_tensor(t, device=like.device, dtype=torch.long)
        v = table.to(like.device)[t].to(like.dtype)
        if v.ndim == 0:
            return v
        return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))

    def _check_t(
        self, t: torch.Tensor | int, like: torch.Tensor | None = None, name: str = "x0"
    ) -> None:
        """TypeError/ValueError unless ``t`` is integer timesteps in 0..T-1, a scalar or, with
        ``like`` ([N x ...]), one per sample (``[N]`` or ``[1]``)."""
        tt = t if isinstance(t, torch.Tensor) else torch.as_tensor(t, device="cpu")
        if tt.dtype.is_floating_point or tt.dtype.is_complex or tt.dtype == torch.bool:
            raise TypeError(f"t: expected integer timesteps, got dtype {tt.dtype}")
        if like is not None:
            if not like.dtype.is_floating_point:
                raise TypeError(f"{name}: expected a floating-point tensor, got dtype {like.dtype}")
            n = like.shape[0] if like.ndim else 1
            if tt.ndim > 1 or (tt.ndim == 1 and tt.numel() not in (1, n)):
                raise ValueError(
                    f"t: expected an int or one timestep per sample (shape ({n},)), got shape "
                    f"{tuple(tt.shape)}"
                )
        # range-checked where that costs no device sync (ints, CPU tensors): a negative t would
        # silently index from the end of the tables
        if tt.device.type == "cpu" and tt.numel():
            lo, hi = int(tt.min()), int(tt.max())
            if lo < 0 or hi >= self.num_train_timesteps:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"t: expected timesteps in 0..{self.num_train_timesteps - 1}, got {bad}"
                )

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor
    ) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        DDPM eq. 4. ``t`` is an int or an (N,) integer tensor; ``noise`` is eps, shaped like x0.
        """
        self._check_t(t, x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise: expected shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        a = self._gather(self.sqrt_alphas_cumprod, t, x0)
        s = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * x0 + s * noise

    def velocity(
        self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor
    ) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0.

        Salimans & Ho, 2022 (arXiv:2202.00512), section 4 / appendix D.
        """
        self._check_t(t, x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise: expected shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        a = self._gather(self.sqrt_alphas_cumprod, t, x0)
        s = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * noise - s * x0

    def training_target(
        self,
        x0: torch.Tensor,
        t: torch.Tensor | int,
        noise: torch.Tensor,
        prediction_type: str = "epsilon",
    ) -> torch.Tensor:
        """Regression target of the simple loss for ``prediction_type``.

        ``"epsilon"``: eps (DDPM eq. 14, L_simple); ``"v_prediction"``: v (:meth:`velocity`);
        ``"sample"``: x_0.
        """
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.velocity(x0, t, noise)
        if prediction_type == "sample":
            return x0
        raise ValueError(
            f"prediction_type: expected one of {list(PREDICTION_TYPES)}, got {prediction_type!r}"
        )

    def predict_x0(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        model_output: torch.Tensor,
        prediction_type: str = "epsilon",
    ) -> torch.Tensor:
        """The model's estimate of x_0 (inverting DDPM eq. 4; DDIM eq. 9 for eps).

        With ab = alpha_bar_t: eps: x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab);
        v: x0 = sqrt(ab) x_t - sqrt(1 - ab) v (Salimans & Ho 2022, section 4); sample: x0.
        """
        self._check_t(t, x_t, "x_t")
        a = self._gather(self.sqrt_alphas_cumprod, t, x_t)
        s = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if prediction_type == "epsilon":
            return (x_t - s * model_output) / a
        if prediction_type == "v_prediction":
            return a * x_t - s * model_output
        if prediction_type == "sample":
            return model_output
        raise ValueError(
            f"prediction_type: expected one of {list(PREDICTION_TYPES)}, got {prediction_type!r}"
        )

    def predict_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        model_output: torch.Tensor,
        prediction_type: str = "epsilon",
    ) -> torch.Tensor:
        """The model's estimate of eps (DDPM eq. 4 solved for it; ab = alpha_bar_t).

        eps: the output itself; v: eps = sqrt(ab) v + sqrt(1 - ab) x_t (Salimans & Ho 2022);
        sample: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab).
        """
        self._check_t(t, x_t, "x_t")
        a = self._gather(self.sqrt_alphas_cumprod, t, x_t)
        s = self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if prediction_type == "epsilon":
            return model_output
        if prediction_type == "v_prediction":
            return a * model_output + s * x_t
        if prediction_type == "sample":
            return (x_t - a * model_output) / s
        raise ValueError(
            f"prediction_type: expected one of {list(PREDICTION_TYPES)}, got {prediction_type!r}"
        )
