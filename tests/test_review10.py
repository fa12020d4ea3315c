"""Regression tests from the session-10 review (review10) of the fused ops, the nn modules, the
UNet and the diffusers integration, as a demanding user would call them.

Each test failed before its fix (the commit that fixed it names the test); the non-bugs that
were checked are listed in notes/s10/review10_log.md.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import backend_cases, randomize_

import fastdiff
from fastdiff.ops.group_norm_silu import group_norm_silu

GN_BACKENDS = [b for d, b in backend_cases("group_norm_silu") if d == "cpu"]


# --------------------------------------------------------------------- group_norm_silu + vmap
@pytest.mark.parametrize("backend", GN_BACKENDS)
@pytest.mark.parametrize("layout", ["in_dims=1", "channels_last"])
def test_vmap_over_strided_slices_with_an_explicit_backend(backend, layout):
    """vmap hands the op per-sample views that are neither contiguous nor channels-last dense
    (in_dims=1) or channels-last ones: asking their memory format with a memory_format argument
    is not implemented inside vmap ("NYI: querying is_contiguous inside of vmap"), which the op
    did for every explicitly requested backend."""
    if backend == "triton" and not fastdiff.build_info()["triton"]:
        pytest.skip("triton not importable")
    if layout == "in_dims=1":
        xs, in_dims = torch.randn(2, 3, 6, 5, 3), 1  # [N x B x C x H x W]
        per_sample = [xs[:, i] for i in range(3)]
    else:
        # [B x N x C x H x W] stored as [B x N x H x W x C]: each sample is channels_last
        xs, in_dims = torch.randn(3, 2, 5, 3, 6).permute(0, 1, 4, 2, 3), 0
        per_sample = list(xs)
        assert per_sample[0].is_contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6), torch.randn(6)
    with fastdiff.use_backend(backend, op="group_norm_silu"):
        out = torch.vmap(lambda t: group_norm_silu(t, 3, w, b), in_dims=in_dims)(xs)
    with fastdiff.use_backend("torch"):
        ref = torch.stack([group_norm_silu(t, 3, w, b) for t in per_sample])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ optimize() and hooks
diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402

UNET2D = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(16, 32),
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
)
UNET2D_COND = dict(
    UNET2D,
    in_channels=4,
    out_channels=4,
    cross_attention_dim=12,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
)


def _halve(_mod, _inp, out):
    return out * 0.5


@pytest.mark.parametrize(
    "where",
    [
        "down_blocks.0.resnets.0.norm1",
        "down_blocks.0.resnets.0.norm2",
        "down_blocks.0.resnets.0.nonlinearity",
        "conv_norm_out",
        "conv_act",
        "mid_block.attentions.0.group_norm",
    ],
)
@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_optimize_keeps_hooked_modules_running(where, kind):
    """A forward (pre-)hook on a module that optimize() would fuse away (a ResnetBlock2D's
    norm1 / norm2 / nonlinearity, conv_norm_out / conv_act, an attention's group_norm) must
    still run: optimize() dropped it silently and the output changed (as
    fuse_group_norm_silu already refuses to fuse hooked pairs)."""
    model = randomize_(UNet2DModel(**UNET2D), 0.05)
    calls: list[str] = []
    mod = model.get_submodule(where)
    if kind == "forward":
        mod.register_forward_hook(lambda m, i, o: (calls.append(where), _halve(m, i, o))[1])
    else:
        mod.register_forward_pre_hook(lambda m, i: (calls.append(where), (i[0] * 0.5,))[1])
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        ref = model(x, t).sample
    n_ref = len(calls)
    fastdiff.optimize(model, channels_last=False)
    calls.clear()
    with torch.no_grad():
        out = model(x, t).sample
    assert len(calls) == n_ref > 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert any("hooks" in why for _, why in model.fastdiff_report.left), str(model.fastdiff_report)


def test_optimize_keeps_hooked_transformer_norm():
    model = randomize_(UNet2DConditionModel(**UNET2D_COND), 0.05)
    where = "down_blocks.0.attentions.0.norm"
    calls = []
    model.get_submodule(where).register_forward_hook(
        lambda m, i, o: (calls.append(1), _halve(m, i, o))[1]
    )
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 12)
    with torch.no_grad():
        ref = model(x, t, c).sample
    fastdiff.optimize(model, channels_last=False)
    calls.clear()
    with torch.no_grad():
        out = model(x, t, c).sample
    assert calls
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert any(name == where for name, _ in model.fastdiff_report.left)


def test_optimize_deepcopy_of_hooked_model_still_equal():
    """The hooked block is left alone; its unhooked siblings are still fused."""
    model = randomize_(UNet2DModel(**UNET2D), 0.05)
    model.down_blocks[0].resnets[0].norm1.register_forward_hook(_halve)
    ref_model = copy.deepcopy(model)
    fastdiff.optimize(model, channels_last=False)
    fused = [m for m in model.modules() if type(m).__name__ == "FusedResnetBlock2D"]
    assert len(fused) == 7  # 8 ResnetBlock2Ds, one hooked
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t).sample, ref_model(x, t).sample)


# ------------------------------------------------------------------------- autocast + autograd
def test_attention_keeps_q_dtype_under_autocast_with_grad():
    """The op returns q's dtype under autocast (its inference path disables autocast), but the
    automatic training path called SDPA under autocast: fp32 inputs came back bf16, computed
    with bf16 matmuls, only when they required grad."""
    from fastdiff.ops.attention import attention

    q, k, v = (torch.randn(1, 2, 7, 32, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        ref = attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
        with torch.no_grad():
            out_nograd = attention(q, k, v)
    assert out_nograd.dtype == torch.float32
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert q.grad.dtype == torch.float32


@pytest.mark.cuda
def test_group_norm_silu_keeps_x_dtype_under_cuda_autocast_with_grad():
    """CUDA autocast runs F.group_norm in fp32; the op's contract is x's dtype, as its inference
    path gives."""
    x = torch.randn(2, 8, 5, 5, device="cuda", dtype=torch.float16, requires_grad=True)
    w, b = torch.randn(8, device="cuda"), torch.randn(8, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = group_norm_silu(x, 4, w, b)
        with torch.no_grad():
            ref = group_norm_silu(x, 4, w, b)
    assert out.dtype == ref.dtype == torch.float16
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------ public reference, empty
@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (2, 8, 0, 3), (2, 0, 3, 3), (0, 8, 5)])
def test_group_norm_silu_reference_takes_empty_inputs(shape):
    """The public eager reference raised "cannot reshape tensor of 0 elements into shape
    [0, 4, -1]" for an empty input, which the op itself returns as an empty output."""
    from fastdiff.ops.group_norm_silu import group_norm_silu_reference

    x = torch.randn(shape)
    c = shape[1]
    w, b = torch.randn(c), torch.randn(c)
    add = torch.randn(shape[0], c)
    ref = group_norm_silu_reference(x, 4, w, b, add=add, scale=add, shift=add)
    assert ref.shape == x.shape and ref.dtype == x.dtype
    with fastdiff.use_backend("torch"):
        assert group_norm_silu(x, 4, w, b, add=add, scale=add, shift=add).shape == x.shape


# ------------------------------------------------------------- torch.compile and use_backend
@pytest.mark.parametrize("op", ["group_norm_silu", "attention"])
def test_compiled_function_follows_use_backend_per_call(op, monkeypatch):
    """A function compiled once ran the backend of its first trace forever: a later
    use_backend("torch") still ran the fused kernel, and a requested backend that cannot run
    (cuda on a CPU tensor) ran another one silently instead of raising (README: "there is no
    silent fallback"; use_backend wins)."""
    from fastdiff.ops import attention as amod
    from fastdiff.ops import group_norm_silu as gmod

    ran: list[str] = []
    if op == "group_norm_silu":
        orig = gmod._forward_impl
        monkeypatch.setattr(gmod, "_forward_impl", lambda *a: (ran.append(a[-1]), orig(*a))[1])
        x = torch.randn(2, 4, 3, 3)
        fn = torch.compile(
            lambda x: gmod.group_norm_silu(x, 2), backend="aot_eager", fullgraph=True
        )
    else:
        orig = amod._run_backend
        monkeypatch.setattr(amod, "_run_backend", lambda *a: (ran.append(a[-1]), orig(*a))[1])
        x = torch.randn(1, 2, 5, 32)
        fn = torch.compile(lambda q: amod.attention(q, q, q), backend="aot_eager", fullgraph=True)
    auto = fastdiff._dispatch.resolve(op, torch.device("cpu"))
    ref = fn(x)
    assert ran == [auto]
    ran.clear()
    with fastdiff.use_backend("torch"):
        torch.testing.assert_close(fn(x), ref, rtol=1e-5, atol=1e-5)
    assert ran == ["torch"]
    if "cuda" not in fastdiff.available_backends(op, "cpu"):
        with fastdiff.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
            fn(x)


# ----------------------------------------------------------------------- nn.GroupNormSiLU
def test_group_norm_silu_module_materialises_from_meta_like_nn_group_norm():
    """GroupNormSiLU is a drop-in for nn.GroupNorm, but had no reset_parameters: a model built
    on the meta device and materialised with to_empty() + reset_parameters() (PyTorch's meta
    init, e.g. FSDP's default param_init) kept uninitialised GroupNorm weights."""
    from fastdiff.nn import GroupNormSiLU

    with torch.device("meta"):
        ours = GroupNormSiLU(4, 8, activation=None)
        ref = torch.nn.GroupNorm(4, 8)
    ours.to_empty(device="cpu")
    ref.to_empty(device="cpu")
    for m in (ours, ref):
        torch.nn.init.constant_(m.weight, float("nan"))  # what to_empty may leave behind
        m.reset_parameters()
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(ours(x), ref(x))
    GroupNormSiLU(4, 8, affine=False).reset_parameters()  # no parameters: nothing to do


# ------------------------------------------------------------------------------ meta device
@pytest.mark.parametrize("grad", [False, True])
def test_ops_on_meta_tensors_give_meta_outputs(grad):
    """Shape inference on the meta device (a model built under torch.device("meta")):
    group_norm_silu returned a meta tensor, attention raised "unknown device type for autocast"
    (torch.is_autocast_enabled("meta"))."""
    from fastdiff.ops.attention import attention

    q = torch.empty(1, 2, 5, 32, device="meta", requires_grad=grad)
    out = attention(q, q, q)
    assert out.device.type == "meta" and out.shape == q.shape
    x = torch.empty(2, 4, 3, 3, device="meta", requires_grad=grad)
    y = group_norm_silu(x, 2, torch.empty(4, device="meta"))
    assert y.device.type == "meta" and y.shape == x.shape


@pytest.mark.parametrize("how", ["forward_hook", "pre_hook", "instance_forward"])
def test_hooks_added_after_optimize_still_run(how):
    """The usual order in a pipeline is optimize() first, then hooks (accelerate's offload
    replaces each leaf module's forward on the instance; feature extractors add forward hooks).
    A fused ResnetBlock2D never calls its norm1 / norm2 / nonlinearity, so such hooks were
    silently skipped: it must run diffusers' own forward while they are present."""
    model = randomize_(UNet2DModel(**UNET2D), 0.05)
    ref_model = copy.deepcopy(model)
    fastdiff.optimize(model, channels_last=False)
    calls: list[int] = []
    for m in (model, ref_model):
        norm = m.down_blocks[1].resnets[0].norm2
        if how == "forward_hook":
            norm.register_forward_hook(lambda mod, i, o: (calls.append(1), o * 0.5)[1])
        elif how == "pre_hook":
            norm.register_forward_pre_hook(lambda mod, i: (calls.append(1), (i[0] * 0.5,))[1])
        else:
            plain = norm.forward
            norm.forward = lambda x, plain=plain: (calls.append(1), plain(x) * 0.5)[1]
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        ref = ref_model(x, t).sample
        n_ref = len(calls)
        out = model(x, t).sample
    assert len(calls) == 2 * n_ref > 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_group_norm_silu_module_loads_a_bias_free_group_norm_state_dict():
    """nn.GroupNorm(bias=False) has only a weight: GroupNormSiLU, documented to load an
    nn.GroupNorm state dict, had no way to be built without a bias. (torch 2.11's GroupNorm has
    no ``bias=`` argument: the bias-free module is made by dropping the parameter, which is what
    ``bias=False`` builds in newer torch.)"""
    from fastdiff.nn import GroupNormSiLU

    gn = torch.nn.GroupNorm(4, 8)
    gn.bias = None
    gn = randomize_(gn, 0.3)
    ours = GroupNormSiLU(4, 8, activation=None, bias=False)
    ours.load_state_dict(gn.state_dict())
    assert ours.bias is None and list(ours.state_dict()) == ["weight"]
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(ours(x), gn(x))
    assert GroupNormSiLU.from_group_norm(gn).bias is None
    assert "bias=False" in repr(ours)


def test_optimize_channels_last_on_a_model_with_5d_weights():
    """optimize() on CPU converts the weights to channels_last by default; a model with 5-D
    weights (UNet3DConditionModel's temporal Conv3d) raised "required rank 4 tensor to use
    channels_last format" from model.to(), after patching it half-way. Only the 4-D tensors
    take the 2-D layout."""
    from diffusers import UNet3DConditionModel

    model = UNet3DConditionModel(
        **dict(
            UNET2D_COND,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        )
    )
    model = randomize_(model, 0.05)
    ref_model = copy.deepcopy(model)
    fastdiff.optimize(model)
    assert model.fastdiff_report.channels_last
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t, c = torch.randn(1, 4, 2, 8, 8), torch.tensor([5]), torch.randn(1, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, t, c).sample, ref_model(x, t, c).sample, rtol=1e-4, atol=1e-4
        )


def test_vmap_over_upsample_with_strided_slices():
    """nn.Upsample (and optimize's FoldedUpsample2D) asked is_contiguous(memory_format=
    channels_last) of its input to pick the folded path: not implemented inside vmap for a
    non-contiguous per-sample view (in_dims=1)."""
    from fastdiff.nn import Upsample

    up = randomize_(Upsample(8), 0.3)
    x = torch.randn(2, 3, 8, 6, 6)
    out = torch.vmap(up, in_dims=1)(x)
    ref = torch.stack([up(x[:, i]) for i in range(3)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_optimize_channels_last_restrides_like_module_to():
    """The 4-D-only conversion must restride exactly as model.to(memory_format=channels_last)
    does, 1x1 conv weights included (whose NCHW strides already count as channels_last
    contiguous, but make oneDNN return NCHW outputs)."""
    model = UNet2DModel(**UNET2D)
    ref = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fastdiff.optimize(model, channels_last=True)
    got = {n: p.stride() for n, p in model.named_parameters()}
    want = {n: p.stride() for n, p in ref.named_parameters()}
    assert got == want
    assert any(p.shape[2:] == (1, 1) for p in model.parameters() if p.dim() == 4)
