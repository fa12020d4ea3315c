"""End to end: one whole sampling run (DDIM, random weights; timing only).

Groups ("e2e <model> b<batch> <dtype>") and variants, ratios always within one group:

* fastdiff UNet (``ddpm-cifar10`` b1/b16 and ``adm-256`` b1, fp16, GPU; ``digits`` fp32 CPU):
    - ``eager``: plain PyTorch, what a user has without fastdiff: the same weights in a twin
      UNet whose norms are ``F.group_norm`` + ``F.silu`` and whose attention is
      ``F.scaled_dot_product_attention``, whose upsampling is ``F.interpolate`` + conv, in
      fastdiff's DDIM loop with the ``torch`` backend;
    - ``compile-max-autotune-no-cudagraphs`` / ``compile-max-autotune``: that twin under
      ``torch.compile`` (only with ``FASTDIFF_BENCH_E2E_COMPILE=1`` and ``FASTDIFF_BENCH_COMPILE``
      not ``0``: ~4 min of autotuning each);
    - ``fused``: ``fastdiff.sample`` on the fused UNet; ``fused-graph``: with ``cuda_graph=True``;
      ``fused-graph-channels-last``: the model in ``torch.channels_last`` too;
    - CPU (``digits``): ``eager``, ``eager-channels-last`` (the twin in channels_last),
      ``fused`` (``fastdiff.sample`` as is: channels_last by default on CPU) and ``fused-nchw``
      (``channels_last=False``).
* diffusers ``UNet2DModel`` with the google/ddpm-cifar10-32 architecture (fp16, GPU):
    - ``eager``: the diffusers loop (``unet(x, t).sample`` + ``DDIMScheduler.step``);
    - ``optimize-diffusers-loop``: the same loop on ``fastdiff.optimize(unet)``;
    - ``optimize``: ``fastdiff.sample(fastdiff.optimize(unet))``; ``optimize-graph``: with graphs;
      ``optimize-graph-channels-last``: ``optimize(unet, channels_last=True)`` with graphs.

``extra_info["steps"]`` holds the step count, so ``plot_e2e.py`` can show time per step.
Run: ``pytest benchmarks/bench_e2e.py --benchmark-only -q``.
"""

from __future__ import annotations

import copy
import os

import benchutil  # steady malloc on CPU; COMPILE
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdiff
from fastdiff.models import UNet
from fastdiff.nn import Attention, GroupNormSiLU, Upsample
from fastdiff.samplers import DDIMSampler
from fastdiff.schedules import NoiseSchedule

# torch.compile(mode="max-autotune*") of a whole UNet autotunes for ~4 minutes per model and
# mode on an H100: far past the GPU suite's benchmark time limit, so these variants have their
# own switch (FASTDIFF_BENCH_COMPILE still gates them too).
COMPILE = os.environ.get("FASTDIFF_BENCH_E2E_COMPILE") == "1" and benchutil.COMPILE
GPU_STEPS = 50
CPU_STEPS = 10


# ---- the plain-PyTorch twin -----------------------------------------------------------------


class TorchGroupNormAct(nn.Module):
    """``GroupNormSiLU`` in plain PyTorch ops (the eager/compile baselines)."""

    def __init__(self, gn: GroupNormSiLU) -> None:
        super().__init__()
        self.gn = gn

    def forward(self, x, add=None, scale=None, shift=None):
        gn = self.gn
        if add is not None:
            x = x + add[:, :, None, None]
        y = F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
        if scale is not None:
            y = y * (1 + scale[:, :, None, None])
        if shift is not None:
            y = y + shift[:, :, None, None]
        return F.silu(y) if gn.activation == "silu" else y


class TorchAttention(nn.Module):
    """``fastdiff.nn.Attention`` in plain PyTorch: GroupNorm, fused QKV linear, SDPA.

    (:func:`torch_twin` turns ``attn.norm`` into a :class:`TorchGroupNormAct` too.)"""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x, context=None):
        a = self.attn
        n, c, h, w = x.shape
        y = a.norm(x).reshape(n, c, h * w).transpose(1, 2)  # [N x L x C]
        qkv = a.to_qkv(y).view(n, h * w, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [N x H x L x D]
        o = a.to_out(o.transpose(1, 2).reshape(n, h * w, c))  # [N x L x C]
        return x + o.transpose(1, 2).reshape(n, c, h, w)


class TorchUpsample(nn.Module):
    """``fastdiff.nn.Upsample`` as written in the papers: nearest 2x, then the 3x3 conv (no
    folded transposed conv)."""

    def __init__(self, up: Upsample) -> None:
        super().__init__()
        self.conv = up.conv

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


def torch_twin(model: UNet) -> UNet:
    """A copy of ``model`` running only stock PyTorch ops (same weights, same math), its weights
    contiguous (NCHW) whatever ``model``'s layout."""
    twin = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    twin.batch_emb_proj = False  # one Linear per ResBlock, as stock UNets (diffusers) project
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GroupNormSiLU):
                setattr(parent, name, TorchGroupNormAct(child))
            elif isinstance(child, Attention):
                setattr(parent, name, TorchAttention(child))
            elif isinstance(child, Upsample):
                setattr(parent, name, TorchUpsample(child))
    return twin


# ---- sampling loops -------------------------------------------------------------------------


def ddim_loop(model, steps: int):
    """fastdiff's DDIM loop with the sampler update on the torch backend (no fused ops)."""
    sampler = DDIMSampler(NoiseSchedule("linear"), steps)

    def run(x):
        ts = sampler.timesteps_on(x.device)
        c = x.shape[1]
        with fastdiff.use_backend("torch"):
            for i in range(steps):
                out = model(x, ts[i].expand(x.shape[0]))
                x = sampler.step(out[:, :c], i, x)  # the eps half when variance is learned
        return x

    return run


def diffusers_loop(unet, steps: int):
    """The diffusers way: ``unet(x, t).sample`` and ``DDIMScheduler.step`` per step."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)

    def run(x):
        for t in scheduler.timesteps:
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x).prev_sample
        return x

    return run


def fastdiff_loop(model, steps: int, cuda_graph: bool = False, channels_last: bool | None = None):
    def run(x):
        return fastdiff.sample(
            model, steps=steps, noise=x, cuda_graph=cuda_graph, channels_last=channels_last
        )

    return run


# ---- cases ----------------------------------------------------------------------------------

UNET_VARIANTS = [
    "eager",
    "compile-max-autotune-no-cudagraphs",
    "compile-max-autotune",
    "fused",
    "fused-graph",
    "fused-graph-channels-last",
]
GPU_CASES = [("ddpm-cifar10", 1), ("ddpm-cifar10", 16), ("adm-256", 1)]
DIFFUSERS_VARIANTS = [
    "eager",
    "optimize-diffusers-loop",
    "optimize",
    "optimize-graph",
    "optimize-graph-channels-last",
]


def _skip_unless(cond: bool, why: str) -> None:
    if not cond:
        pytest.skip(why)


def _run_bench(benchmark, fn, x, group, variant, steps, device, rounds):
    """Time whole sampling runs ``fn(x)``, one per round.

    Not :func:`benchutil.bench`: its fixed 20 calls per round (plus 2 warm-up rounds) would make
    60+ whole 50-step runs per variant, past the GPU suite's time limit. One sampling run
    re-reads every weight 50 times, so L2 rotation is moot. ``extra_info`` carries the same keys
    as ``bench`` (with ``inner=1``) plus ``steps``.
    """
    on_cuda = device.startswith("cuda")

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    def target():
        fn(x)
        sync()

    benchmark.group = group
    with torch.inference_mode():
        target()  # warm-up: compilation, autotuning, graph capture
        benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        variant=variant, bytes=0, flops=0, inner=1, device=device, steps=steps
    )


@pytest.fixture(scope="module")
def unet_cache():
    return {}


def _unet(cache, name, device, dtype):
    key = (name, device, dtype)
    if key not in cache:
        cache.clear()  # one model resident at a time (adm-256 is 554M parameters)
        torch.manual_seed(0)
        cache[key] = UNet.from_preset(name).to(device=device, dtype=dtype).eval()
    return cache[key]


def _variant_fn(model, variant: str, steps: int):
    if variant == "eager":
        return ddim_loop(torch_twin(model), steps)
    if variant.startswith("compile-"):
        mode = variant.removeprefix("compile-")
        return ddim_loop(torch.compile(torch_twin(model), mode=mode), steps)
    if variant.endswith("channels-last"):
        model = fastdiff.optimize(copy.deepcopy(model), channels_last=True)
    if variant == "fused-nchw":  # sample()'s automatic channels_last (CPU) turned off
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        return fastdiff_loop(model, steps, channels_last=False)
    return fastdiff_loop(model, steps, cuda_graph="graph" in variant)


def _needs(variant: str, device: str) -> None:
    if variant.startswith("compile-"):
        _skip_unless(COMPILE, "set FASTDIFF_BENCH_E2E_COMPILE=1 for the torch.compile variants")
    if variant.startswith("fused") or variant.startswith("optimize"):
        try:
            import fastdiff.api  # noqa: F401
        except ImportError as exc:
            pytest.skip(f"fastdiff.sample unavailable: {exc}")
    if "graph" in variant:
        _skip_unless(device.startswith("cuda"), "CUDA graphs need a GPU")


@pytest.mark.parametrize("variant", UNET_VARIANTS)
@pytest.mark.parametrize("name,batch", GPU_CASES, ids=[f"{n}-b{b}" for n, b in GPU_CASES])
def test_e2e_fastdiff_unet_gpu(benchmark, device, unet_cache, name, batch, variant):
    _skip_unless(device.startswith("cuda"), "the fp16 end-to-end suite runs on a GPU")
    _needs(variant, device)
    model = _unet(unet_cache, name, device, torch.float16)
    s = model.sample_size
    x = torch.randn(batch, model.in_channels, s, s, device=device, dtype=torch.float16)
    fn = _variant_fn(model, variant, GPU_STEPS)
    rounds = 3 if name == "adm-256" else 5
    group = f"e2e {name} b{batch} fp16"
    _run_bench(benchmark, fn, x, group, variant, GPU_STEPS, device, rounds=rounds)


def _ddpm_cifar10_diffusers(device):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    return unet.to(device=device, dtype=torch.float16).eval()


@pytest.mark.parametrize("variant", DIFFUSERS_VARIANTS)
def test_e2e_diffusers_unet_gpu(benchmark, device, variant):
    _skip_unless(device.startswith("cuda"), "the fp16 end-to-end suite runs on a GPU")
    pytest.importorskip("diffusers")
    _needs(variant, device)
    unet = _ddpm_cifar10_diffusers(device)
    if variant == "eager":
        fn = diffusers_loop(unet, GPU_STEPS)
    elif variant == "optimize-diffusers-loop":
        fn = diffusers_loop(fastdiff.optimize(unet), GPU_STEPS)
    else:
        cl = variant.endswith("channels-last")
        fn = fastdiff_loop(fastdiff.optimize(unet, channels_last=cl), GPU_STEPS, "graph" in variant)
    x = torch.randn(1, 3, 32, 32, device=device, dtype=torch.float16)
    group = "e2e diffusers-ddpm-cifar10 b1 fp16"
    _run_bench(benchmark, fn, x, group, variant, GPU_STEPS, device, rounds=5)


CPU_VARIANTS = ["eager", "eager-channels-last", "fused-nchw", "fused"]


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_e2e_cpu(benchmark, device, unet_cache, variant):
    """Digits model, fp32, batch 8. On CPU the 3x3 convolutions (oneDNN, near the FMA peak) are
    ~80% of a step, so the fused ops alone move the total little; channels_last speeds the
    convolutions themselves. ``fused`` is ``fastdiff.sample(model)`` as is, which on CPU runs a
    fastdiff UNet in channels_last; ``fused-nchw`` turns that off (``channels_last=False``) and
    ``eager-channels-last`` (the plain twin in channels_last) shows how much of ``fused``'s gain
    is the layout alone."""
    _skip_unless(device == "cpu", "the CPU end-to-end case runs on CPU")
    _needs(variant, device)
    model = _unet(unet_cache, "digits", "cpu", torch.float32)
    x = torch.randn(8, 1, 16, 16)
    if variant == "eager-channels-last":
        twin = torch_twin(model).to(memory_format=torch.channels_last)
        fn = ddim_loop(twin, CPU_STEPS)
    else:
        fn = _variant_fn(model, variant, CPU_STEPS)
    _run_bench(benchmark, fn, x, "e2e digits b8 fp32", variant, CPU_STEPS, device, rounds=5)


DIFFUSERS_CPU_VARIANTS = ["eager", "optimize-diffusers-loop", "optimize", "optimize-nchw"]


def small_diffusers_unet():
    """The CPU case's diffusers UNet2DModel: 32x32, 3 levels, attention at 16x16, fp32, eval."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
    ).eval()


@pytest.mark.parametrize("variant", DIFFUSERS_CPU_VARIANTS)
def test_e2e_diffusers_unet_cpu(benchmark, device, variant):
    """A small diffusers UNet2DModel (fp32, batch 4, 32x32, attention at 16x16) on CPU, 10 steps:
    the diffusers loop as is, the same loop on ``fastdiff.optimize(unet)`` (channels_last by
    default on CPU), ``fastdiff.sample`` on it, and on ``optimize(unet, channels_last=False)``."""
    _skip_unless(device == "cpu", "the CPU end-to-end case runs on CPU")
    pytest.importorskip("diffusers")
    _needs(variant, device)
    unet = small_diffusers_unet()
    if variant == "eager":
        fn = diffusers_loop(unet, CPU_STEPS)
    elif variant == "optimize-diffusers-loop":
        fn = diffusers_loop(fastdiff.optimize(unet), CPU_STEPS)
    else:
        cl = False if variant == "optimize-nchw" else None  # None: channels_last on CPU
        fn = fastdiff_loop(fastdiff.optimize(unet, channels_last=cl), CPU_STEPS)
    x = torch.randn(4, 3, 32, 32)
    group = "e2e diffusers-small b4 fp32"
    _run_bench(benchmark, fn, x, group, variant, CPU_STEPS, device, rounds=5)
