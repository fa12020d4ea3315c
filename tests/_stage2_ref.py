"""Per-call precision harness of the two-stage samplers (Heun, DPM2, DPM2 a) against diffusers.

Each model call starts from the same float64 state (the float64 twin's trajectory): diffusers'
stock scheduler gets it rounded to the working dtype in sigma space (x_sigma), fastdiff gets it
rounded in its VP space (a x_sigma, what the model sees); both get the same model output (and
noise z). Each result is compared with a float64 run of diffusers' step of the same update on
its own noise levels (fastdiff's Heun uses float64 sigmas, diffusers float32 ones: two twins;
DPM2's noise levels are diffusers' float32 values, so there both twins are alike). The error of
one call is max |result - float64| / max |float64| in sigma space. Used by
tests/test_stage2_precision.py.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import DPM2AncestralSampler, DPM2Sampler, HeunSampler

SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),  # sigma_max ~ 2e4
}
SHAPE = (2, 3, 8, 8)


def _classes(kind: str):
    import diffusers

    return {
        "heun": (HeunSampler, diffusers.HeunDiscreteScheduler),
        "dpm2": (DPM2Sampler, diffusers.KDPM2DiscreteScheduler),
        "dpm2_a": (DPM2AncestralSampler, diffusers.KDPM2AncestralDiscreteScheduler),
    }[kind]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over the entries where both are finite (the NaN / inf masks are
    compared apart: an overflow of the working dtype is inf on both sides)."""
    a, b = a.double(), b.double()
    fin = torch.isfinite(b) & torch.isfinite(a)
    if not fin.any():
        return 0.0
    return ((a[fin] - b[fin]).abs().max() / b[fin].abs().max()).item()


@dataclass
class Call:
    """One model call's errors vs float64: ``ours`` (fastdiff) and ``own`` (diffusers' stock
    step in the same dtype); ``masks_equal``: ours' NaN / inf entries are the reference's."""

    i: int
    stage2: bool
    ours: float
    own: float
    masks_equal: bool  # vs the float64 result rounded to the dtype (an overflow is inf)
    in_range: bool = True  # the inputs (x, x_sigma, model output) are finite in the dtype

    @property
    def ratio(self) -> float:
        return self.ours / self.own if self.own > 0 else (0.0 if self.ours == 0 else math.inf)


@dataclass
class Run:
    calls: list[Call] = field(default_factory=list)

    def stage2(self) -> list[Call]:
        return [c for c in self.calls if c.stage2]


def make(kind: str, sched: str, steps: int, **opts):
    """(ours, diffusers' scheduler, float64 twin on our noise levels, float64 twin on diffusers'
    float32 noise levels)."""
    cls, dcls = _classes(kind)
    cfg = SCHEDULES[sched]
    ours = cls(NoiseSchedule.from_diffusers(cfg), steps, **opts)
    theirs, twin, twin32 = (dcls(**cfg, **opts) for _ in range(3))
    for s in (theirs, twin, twin32):
        s.set_timesteps(steps)
        s.set_begin_index(0)
    for s in (twin, twin32):
        for name in ("sigmas", "sigmas_interpol", "sigmas_up", "sigmas_down"):
            if hasattr(s, name):
                setattr(s, name, getattr(s, name).double())
    if kind == "heun":  # ours: float64 step sigmas; diffusers' list [s0, s1, s1, ..., 0]
        sig = torch.from_numpy(ours.sigmas())
        twin.sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
    else:  # DPM2's noise levels are diffusers' float32 values
        np.testing.assert_array_equal(ours.sigmas(), theirs.sigmas[0::2].double().numpy())
    return ours, theirs, twin, twin32


def _call_sigmas(ours) -> np.ndarray:
    if hasattr(ours, "call_sigmas"):
        return ours.call_sigmas()
    s = ours.sigmas()  # Heun: call i's sample is at sigma_{(i + 1) // 2}
    return np.array([s[(i + 1) // 2] for i in range(len(ours) + 1)])


@contextlib.contextmanager
def _shared_noise(box: dict):
    """diffusers' ancestral KDPM2 draws z with randn_tensor: give it ``box["z"]``."""
    import diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete as anc

    old = anc.randn_tensor
    anc.randn_tensor = lambda shape, **kw: box["z"].to(kw["dtype"])
    try:
        yield
    finally:
        anc.randn_tensor = old


def _model_output(x_sig, x64, sigma: float, pred: str, scale: float, g, model: str):
    """A stand-in network's output at noise level sigma, in the parameterisation ``pred`` (VP:
    x = a x0 + s eps, v = a eps - s x0). ``"toy"`` (as tests/test_kdpm2.py's): 0.6 z + 0.4 x
    (clamped VP sample) read as eps / v / x0, an O(1) eps at every sigma, so x0 = x_sigma -
    sigma eps nearly cancels at small sigma (the ill-conditioned second stages); at
    sigma_max ~ 2e4 (cosine) its x0 and the trajectory grow to ~sigma_max. ``"gauss"``: the eps of
    the Gaussian-optimal denoiser of data of size ``scale`` plus an independent error of size 0.6
    scale damped by 1 / sigma at large sigma, so x0 and the trajectory keep the data's size
    (fp16 ranges, cosine)."""
    r = torch.randn(SHAPE, generator=g, dtype=torch.float64) * (0.6 * scale)
    if model == "toy":
        return r + 0.4 * x64.clamp(-3 * scale, 3 * scale)
    eps = x_sig * (sigma / (scale * scale + sigma * sigma)) + r * min(1.0, 1.0 / sigma)
    if pred == "epsilon":
        return eps
    a = 1.0 / math.sqrt(1.0 + sigma * sigma)
    x0 = x_sig - sigma * eps
    return a * eps - a * sigma * x0 if pred == "v_prediction" else x0


@torch.no_grad()
def run_calls(kind: str, sched: str, steps: int, opts: dict | None = None, *, dtype=torch.float32,
              backend: str = "torch", seed: int = 0, scale: float = 1.0,
              model: str | None = None, device: str = "cpu") -> Run:  # fmt: skip
    """Every model call of one run, each from the float64 twin's state (see the module);
    ``model`` (see :func:`_model_output`): "gauss" for cosine or a ``scale``, else "toy".
    fastdiff's step runs on ``device`` (diffusers' and the references on the cpu)."""
    if model is None:
        model = "gauss" if sched == "cosine" or scale != 1.0 else "toy"
    opts = dict(opts or {})
    ours, theirs, twin, twin32 = make(kind, sched, steps, **opts)
    pred = opts.get("prediction_type", "epsilon")
    cs = _call_sigmas(ours)
    g = torch.Generator().manual_seed(seed)
    x_sig = torch.randn(SHAPE, generator=g, dtype=torch.float64) * math.sqrt(1 + cs[0] ** 2)
    x_sig = x_sig * scale
    out = Run()
    box: dict = {}
    with _shared_noise(box), fastdiff.use_backend(backend):
        for i, t in enumerate(theirs.timesteps):
            a = 1.0 / math.sqrt(1.0 + cs[i] ** 2)
            x64 = x_sig * a  # the VP sample the model sees
            theirs.scale_model_input(x_sig.to(dtype), t)
            twin.scale_model_input(x_sig, t)
            twin32.scale_model_input(x_sig, t)
            mo = _model_output(x_sig, x64, cs[i], pred, scale, g, model).to(dtype)
            z = torch.randn(SHAPE, generator=g).to(dtype)
            box["z"] = z
            ref64 = twin.step(mo.double(), t, x_sig).prev_sample
            ref32 = twin32.step(mo.double(), t, x_sig).prev_sample
            own = theirs.step(mo, t, x_sig.to(dtype)).prev_sample
            got = ours.step(mo.to(device), i, x64.to(dtype).to(device), noise=z.to(device))
            got = got.cpu()
            assert got.dtype == dtype
            up = math.sqrt(1.0 + cs[i + 1] ** 2)
            got_sig = got.double() * up  # back to sigma space
            want = (ref64 / up).to(dtype)  # the float64 result, VP, rounded to the dtype
            masks = bool(
                torch.equal(torch.isnan(got), torch.isnan(want))
                and torch.equal(torch.isinf(got), torch.isinf(want))
            )
            fin = all(bool(torch.isfinite(t).all()) for t in (x64.to(dtype), x_sig.to(dtype), mo))
            out.calls.append(
                Call(i, i % 2 == 1, _rel(got_sig, ref64), _rel(own, ref32), masks, fin)
            )
            x_sig = ref64
    return out
