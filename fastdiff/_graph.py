"""``fastdiff.sample(..., cuda_graph=True)``: one whole step (model call + fused update)
captured once as a CUDA graph and replayed for every step.

A graph replays fixed kernels on fixed addresses, so everything a step reads lives in static
device buffers (x, t, the sampler's coefficient row, noise, the DPM-Solver history, the tensor
conditioning), refreshed with device copies before each replay: no host sync. Captures are cached
per model and keyed by everything that changes the kernels (sampler structure, shape, dtype,
device, guidance, the kwargs' shapes, the requested backends); a ``model.to(...)`` that moves
the weights drops them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fastdiff import _dispatch
from fastdiff._conditioning import _prepare_output, _rescaled_guidance, _unwrap
from fastdiff._loop import _philox_state, _progress, _timestep_rows, _trajectory
from fastdiff.samplers import Sampler


def sample_graphed(graphs, model, smp, x, kwargs, gs, generator, progress, callback,
                   return_trajectory, rescale=0.0, start=0, inpaint=None):  # fmt: skip
    """The loop of :func:`fastdiff._loop._sample_eager`, each step a replay of a captured
    :class:`_StepGraph`; ``graphs`` is the capture cache ``{model: {key: _StepGraph, "params":
    the _param_signature the graphs were captured on}}``. A run from call ``start`` > 0
    (img2img) replays the rows :meth:`~fastdiff.samplers.Sampler.run_row` picks (a multistep
    sampler's warm-up again), its history buffers zeroed by ``load``. ``inpaint``
    (:class:`fastdiff._inpaint.Inpaint`): the blend is part of the captured step, its image,
    noise and mask static buffers loaded once per run and its (a, s) row copied per call."""
    n = x.shape[0]
    rows = 2 * n if gs is not None else n
    t_all = _timestep_rows(smp, rows, x.device)
    gen_state = _philox_state(smp, generator, x.device)
    key = (
        gen_state is not None,
        smp.__class__.__name__,
        tuple(sorted(smp.config().items())),
        tuple(x.shape),
        x.dtype,
        str(x.device),
        gs,
        rescale,
        _kw_signature(kwargs),
        _backend_signature(),
        None if inpaint is None else inpaint.signature(),
    )
    per_model = _model_graphs(graphs, model)
    g = per_model.get(key)
    if g is None:
        g = _StepGraph(model, smp, x, kwargs, gs, t_all[0], gen_state, rescale, inpaint)
        per_model[key] = g
    g.smp = smp
    g.load(x, kwargs, gen_state, inpaint)
    ts_host = smp.timesteps.tolist()
    traj_x, traj_x0 = ([x.clone()], []) if return_trajectory else (None, None)
    # PLMS: its history skips a call's output (a device copy after the replay), and its op's m
    # is the raw model output (x0 for trajectories from it and the step's input x)
    fix_history, x0_of = getattr(smp, "graph_history", None), getattr(smp, "x0_of", None)
    for i in _progress(range(start, smp.steps), progress, smp.steps - start):
        noise = None
        if smp.needs_noise(i) and gen_state is None:
            noise = smp._draw_noise(x, generator)  # the sampler's dtype (SDE: fp32)
        x_in = g.x.clone() if return_trajectory and x0_of is not None else None
        g.replay(smp, i, t_all[i], noise, start, inpaint)
        if fix_history is not None:
            fix_history(i - start, g.hist)  # the moves after the run's (i - start)-th call
        if return_trajectory:
            traj_x.append(g.x.clone())
            traj_x0.append(g.x0.clone() if x_in is None else x0_of(g.x0, i, x_in))
        if callback is not None:  # its own copy: the next replay overwrites the static g.x
            callback(i - start, ts_host[i], g.x.clone())
    out = g.x.clone()
    if return_trajectory:
        return out, _trajectory(smp, traj_x, traj_x0, start)
    return out


def _backend_signature() -> tuple[str | None, ...]:
    """The backend asked for per op now (use_backend / set_backend / FASTDIFF_BACKEND): a graph
    captured under one request must not be replayed under another."""
    return tuple(_dispatch.requested_backend(op) for op in sorted(_dispatch.IMPLEMENTED))


class _StepGraph:
    """One captured step: ``out = model(x, t, **kw)``, fused update, ``x <- x_prev`` in place.

    Static device buffers: x (the state), t, coef (the sampler's row for the step), noise,
    the DPM-Solver history x0_prev (and x0_prev2 for order 3, SA-Solver's x0_prev3 / x0_prev4
    for its history_depth 3 / 4; read by the update, then shifted at the end of the graph,
    x0_prev4 <- x0_prev3 <- x0_prev2 <- x0_prev <- the new x0, so a replay never reads a
    buffer it has already overwritten; DPM2's x0_prev <- the step's input x instead), and
    the tensor kwargs (conditioning), all refreshed with device copies before each replay.
    """

    x0_prev2: Tensor | None = None  # DPM-Solver++ 3M's m_{i-2} buffer (set by __init__)
    deep: tuple[Tensor, ...] = ()  # SA-Solver's m_{i-3} (, m_{i-4}) buffers (set by __init__)
    rescale: float = 0.0  # guidance rescale phi (set by __init__)
    has_noise: bool = False  # a noise operand in the step (set by __init__)
    inpaint = None  # static copies of the inpainting blend's operands (set by __init__)
    blend_row: Tensor | None = None  # the blend's (a, s) for the call replayed

    def __init__(
        self,
        model,
        smp: Sampler,
        x: Tensor,
        kwargs,
        gs,
        t_row: Tensor,
        gen_state: Tensor | None,
        rescale: float = 0.0,
        inpaint: Any = None,
    ) -> None:
        self.model, self.gs, self.rescale = model, gs, rescale
        if inpaint is not None:  # the blend's image, noise and mask: static copies
            self.inpaint = copy.copy(inpaint)
            self.inpaint.image, self.inpaint.z = inpaint.image.clone(), inpaint.z.clone()
            self.inpaint.mask = inpaint.mask.clone()
            if inpaint.delta is not None:
                self.inpaint.delta = torch.zeros_like(inpaint.delta)
            self.blend_row = inpaint.table[0].clone()
        self.multistep = smp.is_multistep
        self.x = x.clone()
        self.t = t_row.clone()
        self.coef = smp.coef_table(x.device)[0].clone()
        self.has_noise = any(smp.needs_noise(i) for i in range(smp.steps))
        self.i_cap = next((i for i in range(smp.steps) if smp.needs_noise(i)), 0)
        self.gen_state = gen_state.clone() if gen_state is not None else None
        # fp32: holds any sampler's draw unrounded (DPM++ SDE draws z in fp32 under fp16 x)
        noise_buf = self.has_noise and gen_state is None
        self.noise = torch.zeros_like(x, dtype=torch.float32) if noise_buf else None
        # UniPC: its history (last corrected x, m_{i-1}, m_{i-2}; m_{i-3} at solver_order 3) in
        # static buffers of its own; a sampler that reads fewer (flow_heun: x_i and v_1) names
        # how many in graph_hist_buffers (>= 2), so that no buffer is allocated or copied in vain
        self.unipc = hasattr(smp, "step_with_history")
        n_hist = getattr(
            smp, "graph_hist_buffers", 4 if getattr(smp, "solver_order", 2) >= 3 else 3
        )
        self.hist = [torch.zeros_like(x) for _ in range(n_hist)] if self.unipc else None
        self.x0_prev = torch.zeros_like(x) if self.multistep and not self.unipc else None
        self.history_is_input = getattr(smp, "history_is_input", False)
        # DPM-Solver++ 3M: m_{i-2} in a second buffer, shifted from x0_prev after each step
        order3 = self.x0_prev is not None and getattr(smp, "solver_order", 2) >= 3
        self.x0_prev2 = torch.zeros_like(x) if order3 else None
        # SA-Solver with history_depth 3 / 4: m_{i-3} (and m_{i-4}) in further buffers, shifted
        # the same way (x0_prev4 <- x0_prev3 <- x0_prev2)
        depth = getattr(smp, "history_depth", 0) if order3 else 0
        self.deep = tuple(torch.zeros_like(x) for _ in range(depth - 2))
        self.kwargs = _clone_tree(dict(kwargs))
        self.smp = smp
        _warm_and_capture(self)

    def _body(self) -> Tensor:
        smp, gs = self.smp, self.gs
        x_in = torch.cat([self.x, self.x]) if gs is not None else self.x
        out = _prepare_output(_unwrap(self.model(x_in, self.t, **self.kwargs)), self.x, smp, gs,
                              self.model)  # fmt: skip
        if self.rescale:  # guidance rescale: combined before the op, which then has none
            out, gs = _rescaled_guidance(out, gs, self.rescale), None
        skw = {"generator_state": self.gen_state} if self.gen_state is not None else {}
        if self.unipc:  # the op reads every buffer before the copies below overwrite them
            last, *ms = self.hist  # ms: m_{i-1}, m_{i-2}, ...
            # singlestep SDE: its fresh noise (buffer or in-kernel Philox)
            nkw = {**skw, "noise": self.noise} if self.has_noise else {}
            x_c, x0, x_new = smp.step_with_history(out, self.i_cap, self.x, self.coef, last, *ms,
                                                   guidance_scale=gs, **nkw)  # fmt: skip
            for k in range(len(ms) - 1, 0, -1):  # shifted one back, the oldest first
                ms[k].copy_(ms[k - 1])
            ms[0].copy_(x0)
            last.copy_(x_c)
            self.x.copy_(self._blend(x_new))
            return x0
        if self.multistep:  # DPM-Solver++, Heun: the x0 history rides in x0_prev (x0_prev2)
            if self.x0_prev2 is not None:
                skw["x0_prev2"] = self.x0_prev2
            skw.update(zip(("x0_prev3", "x0_prev4"), self.deep, strict=False))
            x_new, x0 = smp.step(out, self.i_cap, self.x, noise=self.noise, coef=self.coef,
                                 x0_prev=self.x0_prev, guidance_scale=gs, return_x0=True,
                                 **skw)  # fmt: skip
            for k in range(len(self.deep) - 1, -1, -1):  # after the op has read them all
                self.deep[k].copy_(self.deep[k - 1] if k else self.x0_prev2)
            if self.x0_prev2 is not None:  # after the op has read both buffers
                self.x0_prev2.copy_(self.x0_prev)
            # DPM2's stage 2 reads the stage-1 input (self.x, before the update below)
            self.x0_prev.copy_(self.x if self.history_is_input else x0)
        else:
            x_new, x0 = smp.step(out, self.i_cap, self.x, noise=self.noise, coef=self.coef,
                                 guidance_scale=gs, return_x0=True, **skw)  # fmt: skip
        self.x.copy_(self._blend(x_new))
        return x0

    def _blend(self, x_new: Tensor) -> Tensor:
        """Inpainting: the known region blended into the step's result (row ``blend_row``)."""
        return x_new if self.inpaint is None else self.inpaint.blend(x_new, self.blend_row)

    def load(self, x: Tensor, kwargs, gen_state: Tensor | None, inpaint: Any = None) -> None:
        self.x.copy_(x)
        if inpaint is not None:
            self.inpaint.image.copy_(inpaint.image)
            self.inpaint.z.copy_(inpaint.z)
            self.inpaint.mask.copy_(inpaint.mask)
            if self.inpaint.delta is not None:
                self.inpaint.delta.zero_()
        if gen_state is not None:
            self.gen_state.copy_(gen_state)
        if self.x0_prev is not None:
            self.x0_prev.zero_()
        if self.x0_prev2 is not None:
            self.x0_prev2.zero_()
        for h in (*self.deep, *(self.hist or ())):
            h.zero_()
        _copy_tree(self.kwargs, kwargs)

    def replay(
        self,
        smp: Sampler,
        i: int,
        t_row: Tensor,
        noise: Tensor | None,
        start: int = 0,
        inpaint: Any = None,
    ) -> None:
        self.coef.copy_(smp.run_row(i, start, self.x.device))
        if inpaint is not None:
            self.blend_row.copy_(inpaint.table[i])
        self.t.copy_(t_row)
        if noise is not None:
            self.noise.copy_(noise)
        self.graph.replay()


# ------------------------------------------------------------------------ cache keys, buffers
def _model_graphs(graphs: Any, model: Any) -> dict[Any, Any]:
    """``model``'s captured graphs in the cache ``graphs`` (a WeakKeyDictionary: model -> {key:
    graph}), emptied when the model's weights moved (``model.to(...)``, a new layout: the graphs
    read the old ones); a model that is not weak-referenceable gets a fresh dict (capture every
    call)."""
    try:
        per_model = graphs.setdefault(model, {})
    except TypeError:
        per_model = {}
    params = _param_signature(model)
    if per_model.get("params", params) != params:
        per_model.clear()
    per_model["params"] = params
    return per_model


def _warm_and_capture(step: Any) -> None:
    """Capture ``step._body()`` (one sampling step on ``step``'s static buffers) as the CUDA
    graph ``step.graph``, its output ``step.x0``: three warm-up runs on a side stream first
    (cuDNN / Triton autotuning happens outside capture), then ``step.model`` is dropped (the
    graph holds what it needs; the cache's weak key to the model can die)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step._body()
    torch.cuda.current_stream().wait_stream(s)
    step.graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(step.graph):
        step.x0 = step._body()
    step.model = None


def _param_signature(model: Any) -> tuple:
    """Where the model's weights live: a captured graph reads them at these addresses, so a
    ``model.to(...)`` that reallocates them (dtype, device, memory format) must recapture."""
    if not isinstance(model, torch.nn.Module):
        return ()
    return tuple((p.data_ptr(), p.dtype) for p in model.parameters())


def _kw_signature(kwargs: Mapping[str, Any]) -> tuple:
    """The graph-cache key of the model kwargs: tensors (also inside dicts) by shape, dtype and
    device (their values are copied into the capture's buffers), other values by repr."""
    sig = []
    for k in sorted(kwargs, key=repr):
        v = kwargs[k]
        if isinstance(v, Tensor):
            sig.append((k, "T", tuple(v.shape), v.dtype, str(v.device)))
        elif isinstance(v, Mapping):
            sig.append((k, "D", _kw_signature(v)))
        else:
            sig.append((k, "V", repr(v)))
    return tuple(sig)


def _clone_tree(v: Any) -> Any:
    """Static copies of the tensors of a kwarg value (into dicts); other values as they are."""
    if isinstance(v, Tensor):
        return v.clone()
    if isinstance(v, Mapping):
        return {k: _clone_tree(x) for k, x in v.items()}
    return v


def _copy_tree(dst: Any, src: Any) -> None:
    """Refresh the static tensors ``dst`` (from :func:`_clone_tree`) with ``src``'s values."""
    if isinstance(dst, Tensor):
        dst.copy_(src)
    elif isinstance(dst, Mapping):
        for k, x in dst.items():
            _copy_tree(x, src[k])
