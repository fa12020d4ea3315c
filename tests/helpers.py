"""Shared test helpers: devices/backends to test, the FlashAttention error rule, poisoning."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import types
import weakref
import zlib
from collections.abc import Callable

import torch

import fastdiff

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_cases(op: str, include_torch: bool = True) -> list[tuple[str, str]]:
    """(device, backend) pairs for every backend of ``op`` that can run here now."""
    out = []
    for dev in DEVICES:
        for b in fastdiff.available_backends(op, dev):
            if b == "torch" and not include_torch:
                continue
            out.append((dev, b))
    return out


def case_id(case: tuple[str, str]) -> str:
    return f"{case[0]}-{case[1]}"


def stable_seed(*parts: object) -> int:
    """A seed in [0, 1000) from a test's parameters, the same in every process.

    (``hash()`` of a tuple with strings changes with PYTHONHASHSEED: CI drew new inputs each run.)
    """
    return zlib.crc32(repr(parts).encode()) % 1000


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN so that any element a kernel fails to write is caught."""
    return t.fill_(float("nan"))


def assert_fa_rule(
    out: torch.Tensor,
    ref: torch.Tensor,
    eager: torch.Tensor,
    k: float = 2.0,
    atol: float = 0.0,
    name: str = "",
) -> None:
    """FlashAttention rule: max|out - ref| <= k * max|eager - ref| + atol, NaN/inf masks equal.

    ``ref`` is a float64 (or fp32) reference; ``eager`` is plain PyTorch in ``out``'s dtype.
    ``atol`` is a floor for cases where eager happens to be (near) exact.
    """
    out64, ref64, eager64 = out.double(), ref.double(), eager.double()
    assert torch.equal(torch.isnan(out64), torch.isnan(ref64)), f"{name}: NaN mask differs"
    assert torch.equal(torch.isinf(out64), torch.isinf(ref64)), f"{name}: inf mask differs"
    fin = torch.isfinite(ref64)
    if fin.sum() == 0:
        return
    err = (out64 - ref64)[fin].abs().max().item()
    eager_err = (eager64 - ref64)[fin].abs().max().item()
    bound = k * eager_err + atol
    assert err <= bound, f"{name}: max err {err:.3e} > {k} x eager err {eager_err:.3e} + {atol:.1e}"


# A small config that exercises every feature: classes, scale-shift, resblock up/down, heads.
SMALL = dict(
    in_channels=3,
    base_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_heads=2,
    num_groups=4,
    sample_size=8,
)


def randomize_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Perturb every parameter, so zero-initialised convs do not make outputs trivially equal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


# Parity with the diffusers schedulers (test_samplers_parity, test_sampler_euler, test_dpm_sigmas,
# test_euler_ancestral): the sample shape, the relative tolerance in fp32, and the beta schedules
# as diffusers' scheduler kwargs.
PARITY_SHAPE = (2, 3, 8, 8)
PARITY_RTOL = 1e-5
DIFFUSERS_BETAS = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


def import_without_torchsde(module: str, name: str) -> type:
    """diffusers' real scheduler class ``name`` from ``module``, which imports torchsde at its
    top: with torchsde missing it is imported with a placeholder ``torchsde`` module (its
    Brownian tree is never used by the tests), then the placeholder and diffusers'
    ``scheduling_dpmsolver_sde`` module are dropped again, so that other tests still see
    torchsde missing."""
    try:
        import torchsde  # noqa: F401

        placeholder = False
    except ImportError:
        placeholder = True
        sys.modules["torchsde"] = types.ModuleType("torchsde")
    try:
        mod = importlib.import_module(module)
    finally:
        if placeholder:
            del sys.modules["torchsde"]
            sys.modules.pop("diffusers.schedulers.scheduling_dpmsolver_sde", None)
    return getattr(mod, name)


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: capture records nothing, replay re-runs the
    captured step's body and copies its x0 into the static output, as a real replay overwrites
    the captured output buffer. Whatever the body reads must come from the static buffers that
    the step's ``load`` / ``replay`` refresh, as on a GPU, or the results drift from eager."""

    owner = None

    def replay(self):
        self.owner.x0.copy_(self.owner._body())


def fake_cuda_graph_api(monkeypatch, step_cls: type, module: types.ModuleType) -> list:
    """torch.cuda's stream / graph API faked with :class:`FakeGraph` for a graphed loop on CPU
    (``step_cls``: the captured step class, ``_graph._StepGraph`` or
    ``_repaint_graph._RePaintStep``; ``module``: where its capture cache ``_GRAPHS`` lives,
    replaced by a fresh one). Returns the list the captured steps are appended to."""

    class _Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    init = step_cls.__init__
    captured = []

    def init_and_keep(self, model, *args):
        init(self, model, *args)
        self.graph.owner, self.model = self, model  # the fake replays the body: keep the model
        captured.append(self)

    monkeypatch.setattr(step_cls, "__init__", init_and_keep)
    monkeypatch.setattr(module, "_GRAPHS", weakref.WeakKeyDictionary())
    return captured


class SyncSpy(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ops that read a tensor's value on the host (``.item()``, ``bool(t)``,
    ``torch.equal``, ``nonzero``): on a CUDA tensor each is a device sync. Armed by the model's
    first call, so the setup before the loop (host float64 tables) is not counted."""

    SYNC = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.equal.default,
        torch.ops.aten.nonzero.default,
    }

    def __init__(self):
        super().__init__()
        self.armed, self.seen = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.armed and func in self.SYNC:
            self.seen.append(func)
        return func(*args, **(kwargs or {}))


def assert_no_host_sync(
    run: Callable[[Callable[..., torch.Tensor]], torch.Tensor], model: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """``run(armed)`` under a :class:`SyncSpy` that ``armed`` (``model`` with its signature, so
    that sample() still finds where the conditioning goes) arms at its first call: the model
    ran, the output is finite, and the loop read no tensor value on the host (the README's "no
    .item() in the loop"). Returns the output."""
    spy = SyncSpy()

    def armed(*args, **kwargs):
        spy.armed = True
        return model(*args, **kwargs)

    armed.__signature__ = inspect.signature(getattr(model, "forward", model))
    with spy:
        out = run(armed)
    assert spy.armed, "the model was never called"
    assert torch.isfinite(out).all(), "the output is not finite"
    assert spy.seen == [], f"host reads of tensor values inside the loop: {spy.seen}"
    return out


def record_sample_calls(monkeypatch, run: bool = False) -> list[dict]:
    """``fastdiff.sample`` replaced by a recorder (the CLI tests): each call's keyword arguments
    are appended to the returned list; the call then runs the real sample() (``run``) or
    returns zeros of [batch_size x 1 x 16 x 16] (no model call: only what reached sample())."""
    seen: list[dict] = []
    real = fastdiff.sample

    def recorder(model, **kw):
        seen.append(kw)
        return real(model, **kw) if run else torch.zeros(kw["batch_size"], 1, 16, 16)

    monkeypatch.setattr(fastdiff, "sample", recorder)
    return seen
