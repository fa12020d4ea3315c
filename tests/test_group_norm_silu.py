"""fastdiff.ops.group_norm_silu: every available backend vs a float64 reference (FlashAttention
rule), layouts, odd shapes, conditioning inputs, validation, opcheck, autograd, nn module."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_fa_rule, backend_cases, case_id, poison_
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastdiff
import fastdiff.ops.group_norm_silu as gmod
from fastdiff.nn.group_norm import GroupNormSiLU, fuse_group_norm_silu
from fastdiff.ops.group_norm_silu import group_norm_silu, group_norm_silu_reference

OP = "group_norm_silu"
CASES = backend_cases(OP)
IDS = [case_id(c) for c in CASES]
SD_CHANNELS = [320, 640, 1280, 384, 768, 1152, 128, 256]


def _to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nchw":
        return x.contiguous()
    perm = (0, *range(2, x.dim()), 1)
    inv = (0, x.dim() - 1, *range(1, x.dim() - 1))
    return x.permute(perm).contiguous().permute(inv)  # channels-last strides, same values


def _inputs(shape, dtype, device, *, cond=True, affine=True, mag=1.0):
    n, c = shape[:2]
    x = (torch.randn(shape, dtype=torch.float32) * 2 + 0.5) * mag
    p = {
        "weight": torch.randn(c) if affine else None,
        "bias": torch.randn(c) if affine else None,
        "add": torch.randn(n, c) if cond else None,
        "scale": 0.5 * torch.randn(n, c) if cond else None,
        "shift": torch.randn(n, c) if cond else None,
    }
    x = x.to(dtype=dtype, device=device)
    p = {k: (v.to(device) if v is not None else None) for k, v in p.items()}
    return x, p


def _eager(x, g, p, eps=1e-5, silu=True):
    """Plain PyTorch in x's dtype: the baseline the FlashAttention rule measures against."""
    dt, bshape = x.dtype, (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)

    def cast(t):
        return None if t is None else t.to(dt)

    u = x + cast(p["add"]).reshape(bshape) if p["add"] is not None else x
    y = F.group_norm(u, g, cast(p["weight"]), cast(p["bias"]), eps)
    if p["scale"] is not None:
        y = y * (1 + cast(p["scale"]).reshape(bshape))
    if p["shift"] is not None:
        y = y + cast(p["shift"]).reshape(bshape)
    return F.silu(y) if silu else y


def _ref64(x, g, p, eps=1e-5, silu=True):
    d = {k: (v.double().cpu() if v is not None else None) for k, v in p.items()}
    return group_norm_silu_reference(
        x.double().cpu(), g, d["weight"], d["bias"], eps, d["add"], d["scale"], d["shift"], silu
    )


def _run(backend, x, g, p, eps=1e-5, activation="silu"):
    with fastdiff.use_backend(backend, op=OP):
        return group_norm_silu(x, g, eps=eps, activation=activation, **p)


def _skip_unsupported(device, backend, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16 arithmetic")


def _check(out, x, g, p, eps=1e-5, silu=True, name=""):
    ref = _ref64(x, g, p, eps, silu)
    eager = _eager(x, g, p, eps, silu).cpu()
    # the floor scales with the largest finite reference value: with a NaN in ref, max() was NaN
    # and the floor silently 4 eps (test_nan_inf_masks failed on 3 of 300 seeds by 2 ulp at |y| ~ 8)
    atol = 4 * torch.finfo(x.dtype).eps * max(1.0, ref.nan_to_num(0, 0, 0).abs().max().item())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_fa_rule(out.cpu(), ref, eager, k=2, atol=atol, name=name)


# ----------------------------------------------------------------------------- accuracy
# Each SD/SDXL/DDPM channel count once, layouts alternating; the non-power-of-2 channels per
# group (10, 12, 20, 36) appear in both layouts.
SD_CASES = [(320, "nchw"), (320, "cl"), (640, "cl"), (1280, "nchw"), (384, "cl"), (384, "nchw")]
SD_CASES += [(768, "nchw"), (1152, "cl"), (128, "cl"), (256, "nchw")]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("channels,layout", SD_CASES, ids=[f"{c}-{l}" for c, l in SD_CASES])
def test_sd_channels(case, channels, layout):
    device, backend = case
    cond = channels in (320, 1280, 768, 128)
    x, p = _inputs((2, channels, 2, 3), torch.float16, device, cond=cond)
    x = _to_layout(x, layout)
    out = _run(backend, x, 32, p)
    _check(out, x, 32, p, name=f"{backend} C={channels} {layout}")
    if layout == "cl":
        assert out.stride() == x.stride(), "channels_last in must give channels_last out"
    else:
        assert out.is_contiguous()


SHAPES = [
    ((2, 64, 7, 7), 8),  # odd spatial
    ((2, 48, 17, 13), 16),  # odd spatial, 3 channels per group
    ((1, 48, 11), 4),  # 1-D spatial, N = 1
    ((2, 32, 3, 4, 5), 8),  # 3-D spatial
    ((9, 16, 4, 4), 4),  # larger N
    ((2, 30, 5, 3), 5),  # cpg = 6 (not a power of 2)
    ((2, 8, 1, 1), 8),  # one element per group
    ((1, 8, 3000), 4),  # rows longer than the CPU kernel's tile, many NHWC chunks
]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=[str(s[0]) for s in SHAPES])
def test_shapes_dtypes_layouts(case, shape, groups, layout, dtype):
    device, backend = case
    _skip_unsupported(device, backend, dtype)
    cond = (len(shape) + groups) % 2 == 0
    x, p = _inputs(shape, dtype, device, cond=cond, affine=groups != 4)
    x = _to_layout(x, layout)
    out = _run(backend, x, groups, p)
    _check(out, x, groups, p, name=f"{backend} {shape} {layout} {dtype}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("cond", [False, True])
def test_plain_group_norm_activation_none(case, cond):
    device, backend = case
    x, p = _inputs((2, 24, 5, 6), torch.float32, device, cond=cond)
    out = _run(backend, x, 6, p, activation=None, eps=1e-3)
    _check(out, x, 6, p, eps=1e-3, silu=False)


# Each CPU kernel path: NCHW rows <= its tile with > 64 channels per group (chunked stats) and
# short rows with tails; NHWC one-task-per-sample (<= 64k elements) and the chunked path above.
PATH_SHAPES = [((3, 130, 4, 4), 1), ((2, 70, 9), 2), ((1, 32, 2100), 4), ((4, 64, 16, 16), 8)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape,groups", PATH_SHAPES, ids=[str(s[0]) for s in PATH_SHAPES])
def test_channels_with_far_apart_means(case, shape, groups, layout):
    """Per-channel means spread over +-300 (and a time-embedding add): the group statistics
    merge channel moments, which must not cancel."""
    device, backend = case
    x, p = _inputs(shape, torch.float32, device, cond=True)
    offset = 100 * torch.randn(shape[1]).reshape(1, -1, *([1] * (len(shape) - 2)))
    x = _to_layout(x + offset.to(device), layout)
    p["add"] = p["add"] * 10
    out = _run(backend, x, groups, p)
    _check(out, x, groups, p, name=f"{backend} {shape} {layout}")


def test_is_channels_last_matches_its_definition():
    """The fast check (torch's channels_last formats for 4-D/5-D) equals the definition: the
    permuted tensor with C innermost is contiguous, and x itself is not."""
    for shape in [
        (2, 3, 4, 5),
        (1, 3, 1, 1),
        (2, 1, 4, 5),
        (2, 3, 1, 5),
        (2, 3, 2, 3, 4),
        (2, 3, 5),
    ]:
        base = torch.randn(shape)
        perm = (0, *range(2, base.dim()), 1)
        inv = (0, base.dim() - 1, *range(1, base.dim() - 1))
        views = [base, base.permute(perm).contiguous().permute(inv), base.transpose(0, -1)]
        views.append(torch.randn(shape[0], shape[1] + 1, *shape[2:])[:, 1:])
        for x in views:
            want = not x.is_contiguous() and x.permute(perm).is_contiguous()
            assert gmod.is_channels_last(x) == want, (shape, x.stride())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_non_contiguous_inputs(case):
    device, backend = case
    base, p = _inputs((2, 32, 9, 14), torch.float16, device)
    for x in (base[:, :, 1:8, ::2], base.transpose(2, 3)):
        assert not x.is_contiguous() and not gmod.is_channels_last(x)
        out = _run(backend, x, 8, p)
        assert out.is_contiguous()
        _check(out, x, 8, p, name=f"{backend} strides {x.stride()}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp16_times_1000_stays_finite(case):
    device, backend = case
    x, p = _inputs((2, 64, 6, 5), torch.float16, device, mag=1000.0)
    p["add"] = p["add"] * 1000
    for layout in ("nchw", "cl"):
        xl = _to_layout(x, layout)
        out = _run(backend, xl, 16, p)
        assert torch.isfinite(out).all()
        _check(out, xl, 16, p, name=f"{backend} x1000 {layout}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_constant_group_gives_silu_of_shift_plus_bias(case, layout):
    device, backend = case
    x, p = _inputs((2, 12, 5, 5), torch.float32, device)
    p["scale"] = None
    x[:, 3:6] = 3.3  # group 1 (3 channels: mean of 3 equal values) constant in both samples
    x = _to_layout(x, layout)
    p["add"][:, 3:6] = -1.7
    out = _run(backend, x, 4, p)
    assert not torch.isnan(out).any()
    want = F.silu(p["shift"][:, 3:6] + p["bias"][3:6]).reshape(2, 3, 1, 1).expand(2, 3, 5, 5)
    torch.testing.assert_close(out[:, 3:6], want, rtol=1e-6, atol=1e-6)
    _check(out, x, 4, p)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_output_fully_written(case):
    device, backend = case
    x, p = _inputs((2, 40, 6, 7), torch.float32, device)
    out = _run(backend, x, 8, p)
    assert torch.isfinite(out).all()
    # a poisoned (NaN) input group must only spoil its own group
    x2 = x.clone()
    poison_(x2[0, :5])
    out2 = _run(backend, x2, 8, p)
    assert torch.isnan(out2[0, :5]).all()
    torch.testing.assert_close(out2[0, 5:], out[0, 5:])
    torch.testing.assert_close(out2[1], out[1])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy (interpreter)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_nan_inf_masks_match_the_reference(case, layout):
    """An inf spoils its own group (mean inf, variance NaN), a NaN in add its (n, c) row's group,
    an inf in shift only its channel: NaN/inf masks as the float64 reference, the rest by the
    FA rule."""
    device, backend = case
    x, p = _inputs((2, 24, 5, 7), torch.float32, device, cond=True)
    x = _to_layout(x, layout)
    x[0, 3, 2, 4] = float("inf")
    p["add"][1, 17] = float("nan")
    p["shift"][1, 2] = float("inf")
    out = _run(backend, x, 4, p)
    _check(out, x, 4, p)
    assert torch.isnan(out[0, :6]).all() and torch.isfinite(out[0, 6:]).all()
    assert torch.isnan(out[1, 12:18]).all() and torch.isinf(out[1, 2]).all()


TRITON_CASES = [c for c in CASES if c[1] == "triton"]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[case_id(c) for c in TRITON_CASES])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape,groups", [((2, 24, 5, 7), 4), ((1, 40, 33), 8)])
def test_triton_split_plan(case, shape, groups, layout, monkeypatch):
    """The split (stats -> finalize -> apply) plan, forced: it serves few, large groups."""
    from fastdiff.kernels.triton import group_norm_silu as tk

    device, backend = case
    monkeypatch.setattr(tk, "_MAX_FUSED", 0)
    tk._plan.cache_clear()
    try:
        x, p = _inputs(shape, torch.float16, device, cond=layout == "cl")
        cpg = shape[1] // groups
        x[0, cpg : 2 * cpg] = 1.7  # a constant group
        if p["add"] is not None:
            p["add"][0, cpg : 2 * cpg] = 0.3
        x = _to_layout(x, layout)
        plan = tk._plan(shape[0], shape[1], x.numel() // (shape[0] * shape[1]), groups, 2,
                        layout == "cl", 4)  # fmt: skip
        assert plan["kind"] == "split"
        out = _run(backend, x, groups, p)
        _check(out, x, groups, p, name=f"split {shape} {layout}")
        sc = p["scale"][0, cpg : 2 * cpg] if p["scale"] is not None else 0.0
        sh = p["shift"][0, cpg : 2 * cpg] if p["shift"] is not None else 0.0
        want = F.silu(p["bias"][cpg : 2 * cpg] * (1 + sc) + sh)
        got = out[0, cpg : 2 * cpg].reshape(cpg, -1).float()
        torch.testing.assert_close(got, want[:, None].expand_as(got).half().float())
    finally:
        tk._plan.cache_clear()


# --------------------------------------------------------------------------- validation
def _bad_calls(device):
    x = torch.randn(2, 6, 4, 4, device=device)
    return [
        (lambda: group_norm_silu(x, 4), "divisible by num_groups"),
        (lambda: group_norm_silu(x, 3, torch.ones(5, device=device)), "weight"),
        (lambda: group_norm_silu(x, 3, None, torch.ones(7, device=device)), "bias"),
        (lambda: group_norm_silu(x, 3, add=torch.ones(2, 5, device=device)), "add"),
        (lambda: group_norm_silu(x, 3, scale=torch.ones(3, 6, device=device)), "scale"),
        (lambda: group_norm_silu(x, 3, shift=torch.ones(12, device=device)), "shift"),
        (lambda: group_norm_silu(x.to(torch.int32), 3), "dtype"),
        (lambda: group_norm_silu(x, 3, activation="gelu"), "activation"),
        (lambda: group_norm_silu(x[0, 0], 3), "spatial"),
        (lambda: group_norm_silu(x, 0), "num_groups"),
        (lambda: group_norm_silu(x, 3, eps=-1.0), "eps"),
    ], x


@pytest.mark.parametrize("device", sorted({c[0] for c in CASES}))
def test_bad_input_raises_before_any_kernel(device, monkeypatch):
    calls = []
    monkeypatch.setattr(gmod, "_group_norm_silu_op", lambda *a, **k: calls.append(a))
    bad, x = _bad_calls(device)
    before = x.clone()
    for fn, word in bad:
        with pytest.raises(ValueError, match=word):
            fn()
    assert calls == [], "a kernel ran on invalid input"
    assert torch.equal(x, before)


def test_divisibility_message_matches_pytorch_style():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError) as ours:
        group_norm_silu(x, 4)
    with pytest.raises(RuntimeError) as theirs:
        F.group_norm(x, 4)
    assert "Expected number of channels in input to be divisible by num_groups" in str(theirs.value)
    assert "Expected number of channels in input to be divisible by num_groups" in str(ours.value)
    assert "num_groups=4" in str(ours.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
@pytest.mark.cuda
def test_device_mismatch_cuda():
    x = torch.randn(2, 6, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="device"):
        group_norm_silu(x, 3, torch.ones(6))
    with pytest.raises(ValueError, match="device"):
        group_norm_silu(x, 3, add=torch.ones(2, 6))


def test_device_mismatch_meta():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="device"):
        group_norm_silu(x, 3, torch.ones(6, device="meta"))
    with pytest.raises(ValueError, match="device"):
        group_norm_silu(x, 3, shift=torch.ones(2, 6, device="meta"))


def test_explicit_unusable_backend_is_runtime_error():
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"), fastdiff.use_backend("cpu", op=OP):
        group_norm_silu(x, 3)


# ------------------------------------------------------------------------ op machinery
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_opcheck(case):
    device, backend = case
    x, p = _inputs((2, 8, 3, 5), torch.float32, device)
    w = p["weight"].requires_grad_()
    args = (x.requires_grad_(), 4, w, p["bias"], 1e-5, p["add"], p["scale"], p["shift"])
    torch.library.opcheck(gmod._group_norm_silu_op, (*args, True, backend))
    xc = _to_layout(x.detach(), "cl")
    torch.library.opcheck(
        gmod._group_norm_silu_op,
        (xc, 2, None, None, 1e-5, None, None, None, False, backend),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_grads_match_eager(case, layout):
    device, backend = case
    x, p = _inputs((2, 12, 4, 5), torch.float32, device)
    x = _to_layout(x, layout)
    leaves = {"x": x.clone().requires_grad_()}
    leaves.update({k: v.clone().requires_grad_() for k, v in p.items()})
    ours = _run(backend, leaves["x"], 3, {k: leaves[k] for k in p})
    gy = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, list(leaves.values()), gy)
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    ref = _eager(ref_leaves["x"], 3, {k: ref_leaves[k] for k in p})
    g_ref = torch.autograd.grad(ref, list(ref_leaves.values()), gy.double())
    for name, a, b in zip(leaves, g_ours, g_ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=f"grad {name}")


def test_torch_compile_traces():
    fn = torch.compile(lambda x, w: group_norm_silu(x, 4, w), backend="aot_eager", fullgraph=True)
    x, w = torch.randn(2, 8, 3, 3), torch.randn(8)
    torch.testing.assert_close(fn(x, w), group_norm_silu(x, 4, w))


# --------------------------------------------------------------------------- nn module
def test_module_loads_group_norm_state_and_matches():
    gn = torch.nn.GroupNorm(4, 16)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    m = GroupNormSiLU(4, 16)
    m.load_state_dict(gn.state_dict())
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(m(x), F.silu(gn(x)), rtol=1e-5, atol=1e-5)
    m2 = GroupNormSiLU.from_group_norm(gn)
    assert m2.weight is gn.weight and m2.bias is gn.bias
    torch.testing.assert_close(m2(x), F.silu(gn(x)), rtol=1e-5, atol=1e-5)
    plain = GroupNormSiLU(4, 16, activation=None, affine=False)
    assert plain.weight is None and list(plain.parameters()) == []
    torch.testing.assert_close(plain(x), F.group_norm(x, 4), rtol=1e-5, atol=1e-5)
    add, scale, shift = torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 16)
    got = m(x, add=add, scale=scale, shift=shift)
    p = {"weight": m.weight, "bias": m.bias, "add": add, "scale": scale, "shift": shift}
    torch.testing.assert_close(got, _eager(x, 4, p), rtol=1e-5, atol=1e-5)


def test_fuse_group_norm_silu_replaces_pairs():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.GroupNorm(4, 16),
        torch.nn.SiLU(),
        torch.nn.Sequential(torch.nn.GroupNorm(8, 16), torch.nn.SiLU(), torch.nn.Identity()),
        torch.nn.GroupNorm(2, 16),  # not followed by SiLU: kept
        torch.nn.ReLU(),
    )
    for m in net.modules():
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight)
    x = torch.randn(2, 3, 6, 6)
    want = net(x)
    assert fuse_group_norm_silu(net) == 2
    assert isinstance(net[1], GroupNormSiLU) and isinstance(net[3][0], GroupNormSiLU)
    assert type(net[4]) is torch.nn.GroupNorm
    torch.testing.assert_close(net(x), want, rtol=1e-5, atol=1e-5)
    assert fuse_group_norm_silu(net) == 0
    hooked = torch.nn.Sequential(torch.nn.GroupNorm(4, 16), torch.nn.SiLU())
    seen = []
    hooked[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert fuse_group_norm_silu(hooked) == 0  # the hook would be dropped: left alone
    hooked(torch.randn(1, 16, 2, 2))
    assert type(hooked[0]) is torch.nn.GroupNorm and len(seen) == 1


# ------------------------------------------------------------------------- property test
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 3, 4]),
    cpg=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    layout=st.sampled_from(["nchw", "cl"]),
    cond=st.booleans(),
    case=st.sampled_from(CASES),
)
def test_property_matches_reference(n, groups, cpg, spatial, layout, cond, case):
    device, backend = case
    assume(n * math.prod(spatial) > 1)  # eager F.group_norm refuses one value per channel
    torch.manual_seed(n * 131 + groups * 17 + cpg)
    x, p = _inputs((n, groups * cpg, *spatial), torch.float16, device, cond=cond)
    x = _to_layout(x, layout)
    out = _run(backend, x, groups, p)
    _check(out, x, groups, p, name=f"{backend} {tuple(x.shape)} {layout}")


# ------------------------------------------------------------------------- GPU-only sizes
GPU_CASES = [c for c in CASES if c[0] == "cuda" and c[1] != "torch"]
GPU_SHAPES = [(2, 320, 64, 64), (2, 1280, 8, 8), (1, 1152, 16, 16), (16, 128, 32, 32)]
GPU_SHAPES += [(2, 384, 17, 13), (4, 256, 7, 7, 7), (3, 96, 1000)]


@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[case_id(c) for c in GPU_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_real_sizes(case, shape, layout, dtype):
    """Real UNet sizes: the fused and split plans with several vectors/chunks per thread."""
    device, backend = case
    x, p = _inputs(shape, dtype, device, cond=shape[0] != 1)
    x = _to_layout(x, layout)
    out = _run(backend, x, 32, p)
    _check(out, x, 32, p, name=f"{backend} {shape} {layout} {dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[case_id(c) for c in GPU_CASES])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_gpu_past_int32_offsets(case, layout):
    """More than 2^31 elements: offsets must be int64 (apex's GN produced NaNs here)."""
    device, backend = case
    shape = (2, 64, 1 << 24)  # 2^31 elements, 4 GiB in fp16
    if torch.cuda.mem_get_info()[0] < 12 * (1 << 30):
        pytest.skip("needs 12 GiB of free GPU memory")
    x = torch.randn(shape, device=device, dtype=torch.float16)
    x = _to_layout(x, layout)
    out = _run(backend, x, 32, {"weight": None, "bias": None, "add": None, "scale": None,
                                "shift": None})  # fmt: skip
    tail = x[1:, 62:].float()  # the last group, all of it past 2^31 - 2^25 elements
    ref = F.silu(F.group_norm(tail, 1))
    torch.testing.assert_close(out[1:, 62:].float(), ref, rtol=2e-3, atol=2e-3)
    assert torch.isfinite(out[0, :2]).all()
    del x, out
    torch.cuda.empty_cache()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("channels_last", [False, True])
def test_silu_of_very_negative_values_underflows_to_zero(case, channels_last):
    """silu(v) for v far below -88 is -0 (e^-v overflows), not v / e^88: a kernel that clamps
    exp's argument must not return e.g. -1.8 for v = -3e38."""
    dev, backend = case
    torch.manual_seed(7)
    x = torch.randn(2, 16, 9, 7, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.ones(16, device=dev)
    for b in (-1e30, -3e38, -100.0):
        bias = torch.full((16,), b, device=dev)
        y = _run(backend, x, 8, {"weight": w, "bias": bias})
        ref = F.silu(F.group_norm(x.double(), 8, w.double(), bias.double()))
        assert torch.isfinite(y).all()
        assert (y.double() - ref).abs().max().item() <= 1e-30, (backend, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_silu_accuracy_over_its_range(case, channels_last):
    """weight = 0 makes every output exactly act(bias): the kernels' SiLU itself, checked against
    float64 over [-87, 87] (and the sign of its underflow below) with a tight relative bound; the
    GroupNorm tests' tolerance would hide a SiLU a few hundred ulp off."""
    dev, backend = case
    c = 2048
    torch.manual_seed(8)
    x = torch.randn(1, c, 3, 3, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    v = torch.cat([torch.linspace(-87.0, 87.0, c - 8), torch.tensor([0.0, 1e-30, -1e-30, 1e-8,
                   -1e-8, 5e-4, -5e-4, 30.0])]).to(dev)  # fmt: skip
    y = _run(backend, x, 32, {"weight": torch.zeros(c, device=dev), "bias": v})
    want = F.silu(v.double())[None, :, None, None].expand(1, c, 3, 3)
    # host kernels measure <= 3.7e-7; CUDA's __expf is documented at 2 + 1.17|x| ulp, so a GPU
    # gets a looser relative bound (and outputs below 1e-12 an absolute one)
    rtol = 8e-7 if dev == "cpu" else 4e-6
    excess = (y.double() - want).abs() - (rtol * want.abs() + 1e-12)
    assert excess.max().item() <= 0, (backend, excess.max().item())
    assert torch.equal(torch.signbit(y), torch.signbit(want.float())), backend


def test_training_uses_native_kernels_unless_a_backend_is_requested(monkeypatch):
    """Autograd with the automatic choice runs PyTorch's native GroupNorm (its one-kernel
    backward); an explicitly requested backend keeps the custom op (fused forward, analytic
    backward). Gradients match the float64 reference either way."""
    torch.manual_seed(8)
    x, p = _inputs((2, 12, 4, 5), torch.float32, "cpu")
    leaves = {"x": x.clone().requires_grad_()}
    leaves.update({k: v.clone().requires_grad_() for k, v in p.items()})
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    ref = _eager(ref_leaves["x"], 3, {k: ref_leaves[k] for k in p})
    gy = torch.randn(ref.shape)
    g_ref = torch.autograd.grad(ref, list(ref_leaves.values()), gy.double())

    calls = []
    real_op = gmod._group_norm_silu_op
    monkeypatch.setattr(gmod, "_group_norm_silu_op", lambda *a: calls.append(a[-1]) or real_op(*a))
    for requested in (None, "cpu", "torch"):
        calls.clear()
        kw = {k: leaves[k] for k in p}
        if requested is None:
            out = group_norm_silu(leaves["x"], 3, **kw)
        else:
            with fastdiff.use_backend(requested, op="group_norm_silu"):
                out = group_norm_silu(leaves["x"], 3, **kw)
        assert calls == ([] if requested is None else [requested])
        grads = torch.autograd.grad(out, list(leaves.values()), gy)
        for name, a, b in zip(leaves, grads, g_ref, strict=True):
            msg = f"{requested} {name}"
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=msg)
