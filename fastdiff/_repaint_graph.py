"""``fastdiff.repaint(..., cuda_graph=True)``: RePaint's reverse step (model call, fused
``sampler_step`` of the unknown part, the known part and the blend) captured once as a CUDA
graph and replayed for every reverse step; the forward jumps (no model call) run eagerly on the
graph's static state between replays.

As :mod:`fastdiff._graph` (``sample(cuda_graph=True)``), whose cache-key and buffer helpers it
calls: everything a reverse step reads lives in static device buffers (x, t, the step's
``sampler_step`` row and known-part row, z, the image, the mask, the tensor conditioning),
refreshed with device copies before each replay, so there is no host sync. Captures are cached
per model, keyed by what changes the kernels (shape, dtype, device, mask shape, guidance,
prediction type, clipping, the kwargs' shapes, the requested backends); a ``model.to(...)`` that
moves the weights drops them.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from fastdiff._conditioning import _prepare_output, _unwrap
from fastdiff._graph import (
    _backend_signature,
    _clone_tree,
    _copy_tree,
    _kw_signature,
    _model_graphs,
    _warm_and_capture,
)
from fastdiff.samplers.base import _ops, randn_like_with

# model -> {key: _RePaintStep, "params": the _param_signature the graphs were captured on}
_GRAPHS: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()


def repaint_graphed(model, smp, image, mask, x, generator, kwargs, gs, progress, callback,
                    return_trajectory=False):  # fmt: skip
    """:func:`fastdiff.repaint`'s loop (``fastdiff.repaint._repaint_loop``) from x_T = ``x``,
    each reverse step a replay of a captured :class:`_RePaintStep`. The noise is drawn on the
    host side in the eager loop's order (one z per reverse step, one per jumped training step),
    from ``generator``, else from the device's default generator as ``torch.randn`` would (not
    in-kernel Philox: the known part reuses the step's z)."""
    ops = _ops()
    step_tab, known_tab, undo_tab = smp.tables(x.device)
    rows = 2 * x.shape[0] if gs is not None else x.shape[0]
    t_all = smp.timesteps.to(x.device)[:, None].expand(-1, rows).contiguous()
    g = _capture(model, smp, image, mask, x, kwargs, gs, t_all[0], step_tab, known_tab)
    g.load(x, image, mask, kwargs)
    ts_host = smp.timesteps.tolist()
    plan = smp.plan()
    traj_x, traj_x0 = ([x.clone()], []) if return_trajectory else (None, None)
    x0 = None
    entries = enumerate(plan)
    if progress:
        from tqdm.auto import tqdm

        entries = tqdm(entries, total=len(plan))
    for i, (reverse, k) in entries:
        if reverse:
            z = randn_like_with(g.x, generator)  # the eager loop's draw, before its replay
            g.replay(t_all[i], step_tab[k], known_tab[k], z)
            x0 = g.x0.clone() if return_trajectory else None
        else:  # a forward jump on the static state: eager, one sampler_step per training step
            for row in undo_tab[k]:
                z = randn_like_with(g.x, generator)
                g.x.copy_(ops.sampler_step(g.x, g.x, row, prediction_type="sample", noise=z))
            # (x0: the last reverse step's prediction carried, as the eager loop)
        if return_trajectory:
            traj_x.append(g.x.clone())
            traj_x0.append(x0)
        if callback is not None:  # its own copy: the next replay overwrites the static g.x
            callback(i, ts_host[i], g.x.clone())
    out = g.x.clone()
    if return_trajectory:
        reverse = torch.tensor([r for r, _ in plan], dtype=torch.bool)
        traj = {"timesteps": smp.timesteps.clone(), "x": torch.stack(traj_x),
                "x0": torch.stack(traj_x0), "reverse": reverse}  # fmt: skip
        return out, traj
    return out


def _capture(model, smp, image, mask, x, kwargs, gs, t_row, step_tab, known_tab):
    """The cached :class:`_RePaintStep` for this run's structure, captured if new."""
    key = (
        tuple(x.shape),
        x.stride(),  # the returned sample's layout is the captured buffer's
        x.dtype,
        str(x.device),
        tuple(mask.shape),
        gs,
        smp.prediction_type,
        smp.clip_sample,
        _kw_signature(kwargs),
        _backend_signature(),
    )
    per_model = _model_graphs(_GRAPHS, model)
    g = per_model.get(key)
    if g is None:
        g = _RePaintStep(model, smp, image, mask, x, kwargs, gs, t_row, step_tab[0], known_tab[0])
        per_model[key] = g
    return g


class _RePaintStep:
    """One captured reverse step: ``out = model(x, t, **kw)``, ``unknown = sampler_step(x, out,
    step_row, noise=z)``, ``x <- lerp(image * known_row[0] + z * known_row[1], unknown, mask)``
    in place; ``x0`` is the step's (clipped) x0 prediction, a static output."""

    def __init__(self, model, smp, image, mask, x, kwargs, gs, t_row, step_row, known_row):
        self.model, self.gs = model, gs
        self.prediction_type = smp.prediction_type
        self.clip = 1.0 if smp.clip_sample else None
        self.smp = smp  # read by _prepare_output (learned-variance channels): structure only
        self.x, self.z = x.clone(), torch.zeros_like(x)
        self.image, self.mask = image.clone(), mask.clone()
        self.t = t_row.clone()
        self.step_row, self.known_row = step_row.clone(), known_row.clone()
        self.kwargs = _clone_tree(dict(kwargs))
        _warm_and_capture(self)

    def _body(self) -> Tensor:
        gs = self.gs
        x_in = torch.cat([self.x, self.x]) if gs is not None else self.x
        out = _prepare_output(_unwrap(self.model(x_in, self.t, **self.kwargs)), self.x, self.smp,
                              gs, self.model)  # fmt: skip
        unknown, x0 = _ops().sampler_step(
            self.x,
            out,
            self.step_row,
            prediction_type=self.prediction_type,
            clip_range=self.clip,
            guidance_scale=gs,
            noise=self.z,
            return_x0=True,
        )
        known = self.image * self.known_row[0]
        known.addcmul_(self.z, self.known_row[1])
        self.x.copy_(known.lerp_(unknown, self.mask))  # mask 1: the generated part
        return x0

    def load(self, x: Tensor, image: Tensor, mask: Tensor, kwargs) -> None:
        """A run's x_T, image, mask and conditioning into the static buffers."""
        self.x.copy_(x)
        self.image.copy_(image)
        self.mask.copy_(mask)
        _copy_tree(self.kwargs, kwargs)

    def replay(self, t_row: Tensor, step_row: Tensor, known_row: Tensor, z: Tensor) -> None:
        self.t.copy_(t_row)
        self.step_row.copy_(step_row)
        self.known_row.copy_(known_row)
        self.z.copy_(z)
        self.graph.replay()
