"""End-to-end exactness without a trained network: a Gaussian mixture has a closed-form eps.

Data p(x0) = sum_k w_k N(mu_k, tau^2 I) in 2-D. Under q(x_t | x_0) = N(a x_0, s^2 I) (DDPM
eq. 4, a = sqrt(ab_t), s = sqrt(1 - ab_t)) the marginal is
p_t(x) = sum_k w_k N(a mu_k, (a^2 tau^2 + s^2) I), so the optimal denoiser is exact:
eps*(x, t) = -s grad log p_t(x) = s sum_k r_k(x) (x - a mu_k) / (a^2 tau^2 + s^2), with r_k the
posterior responsibilities. Sampling with it must give the mixture back: weights within a few
percent, means within a few hundredths.
"""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff import NoiseSchedule
from fastdiff.samplers import DDIMSampler, DDPMSampler, DPMSolverPPSampler

WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MEANS = torch.tensor([[-0.6, -0.2], [0.5, 0.5], [0.2, -0.7]], dtype=torch.float64)
TAU = 0.06
N = 3000


class GMMEps:
    """Exact eps(x_t, t) of the mixture (or v, for v-prediction) under ``schedule``."""

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> None:
        self.ab = schedule.alphas_cumprod
        self.prediction_type = prediction_type
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == torch.int64 and t.device == x.device
        self.calls += 1
        xd = x.double()
        ab = self.ab[t].unsqueeze(1)  # [N x 1]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        var = a**2 * TAU**2 + s**2  # [N x 1]
        diff = xd.unsqueeze(1) - a.unsqueeze(1) * MEANS  # [N x K x 2]
        logp = WEIGHTS.log() - 0.5 * (diff**2).sum(-1) / var - torch.log(var)  # [N x K]
        r = torch.softmax(logp, dim=1)  # responsibilities
        eps = s * (r.unsqueeze(-1) * diff).sum(1) / var  # [N x 2]
        if self.prediction_type == "v_prediction":
            x0 = (xd - s * eps) / a
            return (a * eps - s * x0).to(x.dtype)
        return eps.to(x.dtype)


def _assert_mixture(x: torch.Tensor, spread: float | None = None) -> None:
    """Weights, means and per-component spread of ``x`` [N x 2] match the mixture.

    ``spread``: the within-component std the sampler is expected to give instead of TAU (a
    sampler whose last update is the denoiser at sigma_1 > 0 returns D(x_sigma_1), whose spread is
    TAU^2 / sqrt(TAU^2 + sigma_1^2)); it is then checked robustly (1.4826 x the median absolute
    deviation, within 35 %: the std of such a collapsed component is dominated by the few samples
    that lie between components)."""
    assert torch.isfinite(x).all()
    d = torch.cdist(x.double(), MEANS)  # [N x K]
    label = d.argmin(1)
    assert (d.min(1).values < 6 * TAU).float().mean() > 0.97, "samples far from every component"
    w = torch.bincount(label, minlength=3).double() / x.shape[0]
    assert (w - WEIGHTS).abs().max() < 0.04, f"weights {w.tolist()} vs {WEIGHTS.tolist()}"
    for k in range(3):
        mu = x[label == k].double().mean(0)
        assert (mu - MEANS[k]).abs().max() < 0.03, f"component {k} mean {mu.tolist()}"
        if spread is None:
            sd = x[label == k].double().std(0)
            assert ((sd - TAU).abs() < 0.5 * TAU).all(), f"component {k} std {sd.tolist()}"
        else:
            y = x[label == k].double()
            mad = 1.4826 * (y - y.median(0).values).abs().median(0).values
            assert ((mad / spread - 1).abs() < 0.35).all(), f"component {k} spread {mad.tolist()}"


def _run(sampler, model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 2, generator=g)
    for i in range(sampler.steps):
        t = sampler.timesteps[i].expand(N)
        noise = torch.randn(N, 2, generator=g) if sampler.needs_noise(i) else None
        x = sampler.step(model(x, t), i, x, noise=noise)
    return x


@pytest.mark.parametrize(
    "make",
    [
        lambda s: DDPMSampler(s, 1000, clip_sample=False),
        lambda s: DDIMSampler(s, 50, clip_sample=False),
        lambda s: DDIMSampler(s, 50, eta=1.0, clip_sample=False, timestep_spacing="trailing"),
        lambda s: DPMSolverPPSampler(s, 20),
    ],
    ids=["ddpm-1000", "ddim-50", "ddim-50-eta1", "dpm++-20"],
)
def test_samplers_recover_mixture(make):
    sched = NoiseSchedule("linear")
    sampler = make(sched)
    _assert_mixture(_run(sampler, GMMEps(sched)))


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
def test_sample_api_recovers_mixture_v_prediction(name):
    sched = NoiseSchedule("cosine")
    model = GMMEps(sched, "v_prediction")
    x = fastdiff.sample(
        model,
        steps=50 if name == "ddim" else 20,
        sampler=name,
        schedule=sched,
        shape=(2,),
        batch_size=N,
        generator=torch.Generator().manual_seed(1),
        prediction_type="v_prediction",
        **({"clip_sample": False} if name == "ddim" else {}),
    )
    assert model.calls == (50 if name == "ddim" else 20)
    _assert_mixture(x)


def test_wrong_schedule_is_detected():
    """A sampler run with a mismatched schedule must NOT pass the check (the test can fail)."""
    model = GMMEps(NoiseSchedule("linear"))
    x = _run(DDIMSampler(NoiseSchedule("cosine"), 50, clip_sample=False), model)
    with pytest.raises(AssertionError):
        _assert_mixture(x)
