"""``FastAttnProcessor``: a diffusers attention processor on :func:`fastdiff.ops.attention`.

    unet.set_attn_processor(FastAttnProcessor())       # models with diffusers' AttentionMixin
    set_attn_processor(unet, FastAttnProcessor())      # any model (UNet2DModel lacks the method)

It mirrors diffusers' ``AttnProcessor2_0`` step for step (spatial norm, group norm, 4-D reshape,
norm_cross, q/k/v projections, q/k norms, output projection and dropout, residual connection,
rescale_output_factor) and only swaps the attention call; on an ``Attention`` with added
key/value projections (``added_kv_proj_dim``: SimpleCrossAttn / UnCLIP blocks) it mirrors
``AttnAddedKVProcessor2_0`` instead. Inputs the fused op does not take go to
``torch.nn.functional.scaled_dot_product_attention`` exactly as ``AttnProcessor2_0`` would call it:
an attention mask, or a dtype other than fp16/bf16/fp32. Head dims outside the fused kernels' set
are routed to SDPA by the dispatch table itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fastdiff import _dispatch
from fastdiff.ops.attention import attention

__all__ = ["FastAttnProcessor", "set_attn_processor"]

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class FastAttnProcessor:
    """Drop-in replacement for diffusers' ``AttnProcessor2_0`` running fastdiff attention.

    ``fused_calls`` / ``sdpa_calls`` count the calls that went to :func:`fastdiff.ops.attention`
    and to SDPA (mask or dtype), so callers can see where attention ran.
    """

    def __init__(self) -> None:
        self.fused_calls = 0
        self.sdpa_calls = 0

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if getattr(attn, "added_kv_proj_dim", None) is not None:
            return self._added_kv(attn, hidden_states, encoder_hidden_states, attention_mask)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            # [B x C x H x W] -> [B x HW x C]
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, sequence_length, batch_size
            )
            # [B x heads x Lq x Lk] as SDPA expects
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        # [B x L x heads*Dh] -> [B x heads x L x Dh] (strided views; the kernels take strides)
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self._attend(query, key, value, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor != 1.0:  # x / 1 == x exactly: skip that kernel
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v over ``[B x heads x L x Dh]``: fused, or SDPA with a mask
        or another dtype. SDPA is PyTorch's (the ``torch``/``sdpa`` backends, and ``cpu`` on CPU
        tensors): an explicitly requested ``cuda``/``triton`` backend raises instead."""
        fused = (
            mask is None
            and query.dtype in _FUSED_DTYPES
            and key.dtype == query.dtype
            and value.dtype == query.dtype
        )
        if fused:
            self.fused_calls += 1
            return attention(query, key, value)
        requested = _dispatch.requested_backend("attention")
        if requested in ("cuda", "triton") or (requested == "cpu" and query.device.type != "cpu"):
            what = "an attention mask" if mask is not None else f"{query.dtype} inputs"
            raise RuntimeError(
                f"fastdiff: backend {requested!r} was requested for attention, but "
                f"FastAttnProcessor got {what}, which only PyTorch's SDPA runs (use the "
                f"automatic choice or use_backend('sdpa', op='attention'))"
            )
        self.sdpa_calls += 1
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False
        )

    def _added_kv(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """diffusers' ``AttnAddedKVProcessor2_0`` (UnCLIP / SimpleCrossAttn blocks): keys and
        values of the context (``add_k_proj`` / ``add_v_proj``) come before the image's own
        (none with ``only_cross_attention``); the residual is always added."""
        residual = hidden_states  #                                          [B x C x H x W]
        hidden_states = hidden_states.view(hidden_states.shape[0], hidden_states.shape[1], -1)
        hidden_states = hidden_states.transpose(1, 2)  #                     [B x HW x C]
        batch_size, sequence_length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(
            attention_mask, sequence_length, batch_size, out_dim=4
        )
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B x L x heads*Dh] -> [B x heads x L x Dh]
            return attn.head_to_batch_dim(t, out_dim=4)

        query = heads(attn.to_q(hidden_states))
        key = heads(attn.add_k_proj(encoder_hidden_states))
        value = heads(attn.add_v_proj(encoder_hidden_states))
        if not attn.only_cross_attention:
            key = torch.cat([key, heads(attn.to_k(hidden_states))], dim=2)
            value = torch.cat([value, heads(attn.to_v(hidden_states))], dim=2)

        hidden_states = self._attend(query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, residual.shape[1])
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        hidden_states = hidden_states.transpose(-1, -2).reshape(residual.shape)
        return hidden_states + residual


def set_attn_processor(model: torch.nn.Module, processor: Any) -> int:
    """Install ``processor`` on every diffusers attention module in ``model``; returns how many.

    Uses ``model.set_attn_processor`` when the model has it; otherwise (diffusers' UNet2DModel has
    no such method) calls ``set_processor`` on each submodule that has one.
    """
    mods = [m for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(processor)
    else:
        for m in mods:
            m.set_processor(processor)
    return len(mods)
