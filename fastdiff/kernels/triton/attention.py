"""Flash-attention forward in Triton (Dao et al. 2022, Alg. 1; FlashAttention-2 loop order).

One program owns a BLOCK_M tile of queries of one (batch, head) and streams BLOCK_N key/value
tiles past it, keeping per-row running max ``m`` and exp-sum ``l`` in fp32 (online softmax,
Milakov & Gimelshein 2018):

    m' = max(m, rowmax(S_j)),  P_j = 2^(S_j - m'),  l' = 2^(m - m') l + rowsum(P_j),
    acc' = 2^(m - m') acc + P_j V_j,                 O = acc / l

with ``S_j = (log2 e · scale) Q K_j^T``, i.e. log2(e) is folded into the scale so the kernel uses
exp2. Head dims that are not a power of two are split into two power-of-two parts D0 + D1
(80 = 64 + 16, 96 = 64 + 32, 160 = 128 + 32, exact; 40 = 32 + 16 with 8 masked lanes, i.e. 48
columns of math instead of the 64 a single padded power-of-two tile would cost).

Grid: axis 0 = B * H (up to 2^31 - 1 programs), axis 1 = query tiles (<= 65535). Batch/head
offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff import _dispatch
from fastdiff.kernels.triton import _compat
from fastdiff.kernels.triton._device import sm_count

_compat.patch_interpreter()

_LOG2E = 1.4426950408889634


def _split_head_dim(D: int) -> tuple[int, int]:
    """D -> (D0, D1): D0 the largest power of two <= D, D1 a power of two >= D - D0 (or 0)."""
    d0 = 1 << (D.bit_length() - 1)
    rest = D - d0
    if rest == 0:
        return d0, 0
    return d0, max(16, triton.next_power_of_2(rest))


@triton.jit
def _load(ptrs, row_mask, col_mask, USE_ROW: tl.constexpr, USE_COL: tl.constexpr):
    """tl.load with only the masks that can be false (constexpr flags), zeros elsewhere."""
    if USE_ROW and USE_COL:
        x = tl.load(ptrs, mask=row_mask & col_mask, other=0.0)
    elif USE_ROW:
        x = tl.load(ptrs, mask=row_mask, other=0.0)
    elif USE_COL:
        x = tl.load(ptrs, mask=col_mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _attn_fwd_kernel(
    Q,  # [B x H x Lq x D] queries (strided)
    K,  # [B x H x Lk x D] keys (strided)
    V,  # [B x H x Lk x D] values (strided)
    O,  # [B x H x Lq x D] output (contiguous)
    qk_scale,  # scale * log2(e)
    stride_qb, stride_qh, stride_qm, stride_qd,  # q strides (elements)
    stride_kb, stride_kh, stride_kn, stride_kd,  # k strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # v strides
    stride_ob, stride_oh, stride_om,  # output strides (unit stride on D)
    H,  # heads
    Lq,  # query length
    Lk,  # key length
    D: tl.constexpr,  # head dim
    D0: tl.constexpr,  # first power-of-two part of D
    D1: tl.constexpr,  # second power-of-two part (0 = none); lanes >= D are masked
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per iteration
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), "tf32" otherwise (unused)
    EVEN_N: tl.constexpr,  # Lk % BLOCK_N == 0: no key masking
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    m_mask = offs_m < Lq
    q0 = tl.load(
        q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d0[None, :] * stride_qd,
        mask=m_mask[:, None],
        other=0.0,
    )  # [BLOCK_M x D0]
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        d1_mask = offs_d1 < D
        q1 = tl.load(
            q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d1[None, :] * stride_qd,
            mask=m_mask[:, None] & d1_mask[None, :],
            other=0.0,
        )  # [BLOCK_M x D1]
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < Lk
        row_k = offs_n.to(tl.int64) * stride_kn
        k0 = _load(
            k_base + row_k[None, :] + offs_d0[:, None] * stride_kd,
            n_mask[None, :],
            None,
            not EVEN_N,
            False,
        )  # [D0 x BLOCK_N]
        s = tl.dot(q0, k0, input_precision=DOT_PRECISION)
        if D1 > 0:
            k1 = _load(
                k_base + row_k[None, :] + offs_d1[:, None] * stride_kd,
                n_mask[None, :],
                d1_mask[:, None],
                not EVEN_N,
                D0 + D1 > D,
            )  # [D1 x BLOCK_N]
            s = tl.dot(q1, k1, s, input_precision=DOT_PRECISION)
        if EVEN_N:
            s = s * qk_scale  # [BLOCK_M x BLOCK_N], log2 units
        else:
            s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        row_v = offs_n.to(tl.int64) * stride_vn
        v0 = _load(
            v_base + row_v[:, None] + offs_d0[None, :] * stride_vd,
            n_mask[:, None],
            None,
            not EVEN_N,
            False,
        )  # [BLOCK_N x D0]
        p_in = p.to(v0.dtype)
        acc0 = tl.dot(p_in, v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
        if D1 > 0:
            v1 = _load(
                v_base + row_v[:, None] + offs_d1[None, :] * stride_vd,
                n_mask[:, None],
                d1_mask[None, :],
                not EVEN_N,
                D0 + D1 > D,
            )  # [BLOCK_N x D1]
            acc1 = tl.dot(p_in, v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)

    inv_l = 1.0 / l_i
    o_rows = o_base + offs_m[:, None].to(tl.int64) * stride_om
    tl.store(
        o_rows + offs_d0[None, :],
        (acc0 * inv_l[:, None]).to(O.dtype.element_ty),
        mask=m_mask[:, None],
    )
    if D1 > 0:
        tl.store(
            o_rows + offs_d1[None, :],
            (acc1 * inv_l[:, None]).to(O.dtype.element_ty),
            mask=m_mask[:, None] & d1_mask[None, :],
        )


def _configs() -> list[triton.Config]:
    out = []
    for bm, bn, warps, stages in (
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (64, 128, 4, 3),
        (64, 32, 4, 4),
        (32, 64, 2, 3),
        (32, 32, 2, 4),
    ):
        out.append(
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        )
    return out


def _prune(configs, named_args, **kwargs):
    """Drop configs whose key tile dwarfs Lk, and (when enough are left) configs that leave
    SMs idle: B*H*ceil(Lq/BLOCK_M) programs should cover the GPU."""
    lk, lq = named_args["Lk"], named_args["Lq"]
    bh = named_args["Q"].shape[0] * named_args["Q"].shape[1]
    keep = [c for c in configs if c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(lk))]
    keep = keep or configs
    sms = _num_sms()
    full = [c for c in keep if bh * triton.cdiv(lq, c.kwargs["BLOCK_M"]) >= sms]
    return full or keep


def _num_sms() -> int:
    return sm_count(torch.cuda.current_device()) if torch.cuda.is_available() else 1


_autotuned = None
_with_heuristics = triton.heuristics({"EVEN_N": lambda a: a["Lk"] % a["BLOCK_N"] == 0})(
    _attn_fwd_kernel
)


def _tuned_kernel():
    global _autotuned
    if _autotuned is None:
        _autotuned = triton.autotune(
            configs=_configs(),
            key=["Lq", "Lk", "D"],  # Triton adds the tensors' dtypes to the key
            prune_configs_by={"early_config_prune": _prune},
        )(_with_heuristics)
    return _autotuned


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or _dispatch._getenv("TRITON_INTERPRET") == "1"


# (Lq, Lk, D, dtype, device) -> the autotuned config's launch kwargs. The autotuner's own cached
# path rebuilds dicts of all ~30 arguments and runs the heuristics wrapper on every call (tens of
# microseconds of Python per launch); after the first call for a key we launch the JIT kernel
# directly with the config it chose (same key: Triton's autotuner keys on Lq, Lk, D and dtypes).
_BEST: dict[tuple, dict] = {}


def _launch_tuned(common: tuple, B: int, H: int, Lq: int, Lk: int, D: int, d0: int, d1: int,
                  prec: str, q: torch.Tensor) -> None:  # fmt: skip
    key = (Lq, Lk, D, q.dtype, q.device)
    cfg = _BEST.get(key)
    if cfg is None:
        tuner = _tuned_kernel()

        def grid(meta):
            return (B * H, triton.cdiv(Lq, meta["BLOCK_M"]))

        tuner[grid](*common, D=D, D0=d0, D1=d1, DOT_PRECISION=prec)
        best = getattr(tuner, "best_config", None)
        if best is not None and best.pre_hook is None:
            _BEST[key] = best.all_kwargs()
        return
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    _attn_fwd_kernel[(B * H, triton.cdiv(Lq, bm))](
        *common, D=D, D0=d0, D1=d1, DOT_PRECISION=prec, EVEN_N=Lk % bn == 0, **cfg
    )


# Devices on which fp16/bf16 head dims with masked lanes (D = 40: 32 + 16, 8 lanes masked) run
# zero-padded to the exact split (48 = 32 + 16) instead. The H100 GPU suite (triton 3.6,
# 2026-11-24) hit an illegal memory access while autotuning fp16 D=40, Lq=5, Lk=257 (configs
# with BLOCK_N >= 64); fp32 D=40 and fp16 D=80 (exact 64 + 16) passed, so the masked-lane loads
# are the suspect. Zero columns change no logit; the padded output columns are dropped.
_PAD_MASKED_HEAD_DIM_ON: tuple[str, ...] = ("cuda",)


def _padded_head_dim(q: torch.Tensor, d0: int, d1: int) -> int:
    """D0 + D1 when q's head dim should be zero-padded to it, else 0."""
    D = q.shape[-1]
    pad = d0 + d1 > D and q.dtype != torch.float32
    return d0 + d1 if pad and q.device.type in _PAD_MASKED_HEAD_DIM_ON else 0


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    out = t.new_zeros((*t.shape[:-1], width))
    out[..., : t.shape[-1]] = t
    return out


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Launch the flash forward. q [B x H x Lq x D], k/v [B x H x Lk x D] (any strides) ->
    contiguous [B x H x Lq x D] in q's dtype. Callers validate shapes/dtypes."""
    padded = _padded_head_dim(q, *_split_head_dim(q.shape[-1]))
    if padded:  # [B x H x L x D] -> [B x H x L x padded], zeros beyond D
        out = attention_forward(*(_pad_last(t, padded) for t in (q, k, v)), scale)
        return out[..., : q.shape[-1]].contiguous()
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    d0, d1 = _split_head_dim(D)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    common = (
        q, k, v, out, float(scale) * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(),
        out.stride(0), out.stride(1), out.stride(2),
        H, Lq, Lk,
    )  # fmt: skip
    if _interpreting(q):
        bm, bn = 32, 32
        _attn_fwd_kernel[(B * H, triton.cdiv(Lq, bm))](
            *common, D=D, D0=d0, D1=d1, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=prec,
            EVEN_N=Lk % bn == 0,
        )  # fmt: skip
        return out
    _launch_tuned(common, B, H, Lq, Lk, D, d0, d1, prec, q)
    return out
