"""Run bookkeeping of the multistep samplers on the fused ``unipc_step`` op (PNDM, LMS, DEIS,
iPNDM, UniPC, singlestep DPM-Solver).

Each step of these samplers is one op call whose ``m`` output is kept as the history of the
next steps. A run that starts at step s > 0 (img2img) has no history yet: its first calls take
other rows (lower order), which the sampler precomputes as ``_since64[k]`` (float64 ``[steps x
12]``: the rows of the k-th call of a run) beside its full table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fastdiff.samplers.base import _unipc_ops, cached


class RunRows:
    """A run's bookkeeping (PNDM, LMS, DEIS, iPNDM, UniPC, singlestep DPM-Solver): the warm-up
    tables ``_since64`` beside the full one (their fp32 device copies built on first use and
    cached per device), and where a call stands in its run (:meth:`_run_call`)."""

    _since64: list[np.ndarray]

    def _variant(self, k: int, device: torch.device) -> Tensor:
        """The fp32 table of rows for the ``k``-th call of a run (k < warm-up), cached."""
        tables = self.__dict__.setdefault("_variant_tables", {})
        return cached(
            tables, (k, device), lambda: torch.from_numpy(self._since64[k]).float().to(device)
        )

    def _run_warmup(self) -> int:
        """The calls of a run that take ``_since64`` rows (later ones: the full table's)."""
        raise NotImplementedError

    def run_row(self, i: int, start: int, device: torch.device | str) -> Tensor:
        """Call ``i``'s row in a run from call ``start``, as the eager ``step`` picks it."""
        k = i - start
        if start == 0 or k >= self._run_warmup():
            return self.coef_table(device)[i]
        return self._variant(k, torch.device(device))[i]

    def _set_since_rows(
        self, rows: np.ndarray, row: Callable[[int, int], np.ndarray]
    ) -> np.ndarray:
        """Set ``_since64`` beside the full table ``rows`` (a run from call 0; returned):
        ``_since64[k]`` (k < the warm-up) holds ``row(i, k)``, call i's row as the k-th call of
        a run, at every i >= k, and ``rows[i]`` below (no run has its k-th call there)."""
        n = len(rows)
        self._since64 = [np.stack([row(i, k) if i >= k else rows[i] for i in range(n)])
                         for k in range(self._run_warmup())]  # fmt: skip
        self._variant_tables: dict[tuple[int, torch.device], Tensor] = {}
        return rows

    def _order_rows(
        self,
        orders: Callable[[int | None], list[int]],
        row: Callable[[int, int], np.ndarray],
    ) -> np.ndarray:
        """The full table of a sampler whose call i at order o has the row ``row(i, o)``, the
        orders of a run from call 0 being ``orders(None)`` and those of a run's k-th call
        ``orders(k)`` (diffusers' ``lower_order_nums``); sets ``step_orders`` and ``_since64``
        (a row recomputed only where the order differs)."""
        full = orders(None)
        rows = np.stack([row(i, o) for i, o in enumerate(full)])
        #: the order of each call in a run from call 0
        self.step_orders = tuple(full)
        by_k = [orders(k) for k in range(self._run_warmup())]
        return self._set_since_rows(
            rows, lambda i, k: row(i, by_k[k][i]) if by_k[k][i] != full[i] else rows[i]
        )

    def _run_call(
        self, i: int, x: Tensor, newest: Tensor | None
    ) -> tuple[bool, int, Tensor, np.ndarray]:
        """Where call ``i`` stands in its run: it goes on with the run when ``newest`` (the
        kept output of the last call) is of call i - 1 and fits x's shape and device, else it
        starts a new one (``_start`` = i: img2img, diffusers' ``set_begin_index``, or a reused
        sampler). Returns (goes on, k = i - ``_start``, call i's fp32 row on x's device, its
        float64 row): the warm-up table ``_since64[k]``'s while k < the warm-up, else the full
        table's."""
        valid = (newest is not None and self._prev_i == i - 1 and newest.shape == x.shape
                 and newest.device == x.device)  # fmt: skip
        if not valid:
            self._start = i
        k = i - self._start
        full = k >= self._run_warmup()
        table = self.coef_table(x.device) if full else self._variant(k, x.device)
        return valid, k, table[i], (self._coef64 if full else self._since64[k])[i]


# the columns of a unipc_step row that weigh each history operand: last (c_last), m_{i-1}
# (c_m1, p_m1), m_{i-2} (c_m2, p_m2), m_{i-3} (c_m3)
_LAST_COL, _M_COLS = 3, ((5, 9), (6, 11), (10,))


def read_operands(r: np.ndarray, hist: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The kept operands ``hist`` = ``[last, m_{i-1}, m_{i-2}, m_{i-3}]`` (the first ones
    only, when fewer are given) that a ``unipc_step`` call with the float64 row ``r`` reads,
    None for the others: last when its weight is nonzero, an m when its weight or an older
    m's is (the op takes m_prev3 only with m_prev2, m_prev2 only with m_prev)."""
    need, out = False, []
    for t, cols in reversed(list(zip(hist[1:], _M_COLS, strict=False))):
        need = need or any(r[c] != 0.0 for c in cols)
        out.insert(0, t if need else None)
    return [hist[0] if r[_LAST_COL] != 0.0 else None, *out]


class EpsHistory(RunRows):
    """Step bookkeeping of LMS and DEIS: the op's ``m`` output of each step is a noise estimate
    (LMS's derivative d = eps, DEIS's eps) kept for the next ``_n_hist`` steps, newest first.

    The sampler provides ``_n_hist``, ``_max_order()`` (its multistep order), ``_sigma_at(i)``
    (the noise level sigma = sqrt((1 - ab) / ab) of step i), ``_op_prediction()`` (the op's
    prediction_type that turns its model output into the noise estimate with the row's (a, s))
    and the tables (``coef_table``, ``_coef64``, ``_since64``); one that does more in a fused
    call (DEIS's thresholding) overrides ``step_with_history``."""

    _n_hist = 3

    def _max_order(self) -> int:
        raise NotImplementedError

    def _sigma_at(self, i: int) -> float:
        raise NotImplementedError

    def _run_warmup(self) -> int:
        return self._max_order() - 1

    def _noising(self, i: int) -> tuple[float, float]:
        """img2img: diffusers' x0 + sigma eps at step i's sigma as the VP sample (a, a sigma)
        with a = 1 / sqrt(1 + sigma^2) (LMS; DEIS's alpha_t, sigma_t of its sigma)."""
        a = 1.0 / math.sqrt(1.0 + self._sigma_at(i) ** 2)
        return a, a * self._sigma_at(i)

    def reset(self) -> None:
        """Forget the run: the next step starts a new one (no history)."""
        self._hist: list[Tensor | None] = [None] * self._n_hist
        self._prev_i = -1
        self._start = 0

    def _op_prediction(self) -> str:
        raise NotImplementedError

    def x0_of(self, m: Tensor, i: int, x: Tensor) -> Tensor:
        """The x0 prediction of step ``i`` at the VP sample ``x`` from its noise estimate ``m``
        (for trajectories; a torch expression, not part of the fused step)."""
        sig = self._sigma_at(i)
        a = 1.0 / math.sqrt(1.0 + sig * sig)
        return ((x.float() - a * sig * m.float()) / a).to(x.dtype)

    def step(
        self,
        model_output: Tensor,
        i: int,
        x: Tensor,
        noise: Tensor | None = None,
        *,
        guidance_scale: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        generator_state: Tensor | None = None,
        return_x0: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Step ``i`` (model output at ``x``, ``timesteps[i]``): one fused op call.

        The noise estimates are kept on the sampler and used only when step ``i - 1`` was the
        last one it ran for this x shape and device; otherwise step ``i`` starts a new run
        (img2img, as diffusers after ``set_begin_index``). Deterministic: ``noise``,
        ``generator`` and ``generator_state`` are unused. Returns x_{i+1}, or ``(x_{i+1}, x0)``
        with ``return_x0``."""
        self._check_step_args(model_output, i, x, noise, guidance_scale)
        valid, _, row, r = self._run_call(i, x, self._hist[0])
        hist = self._hist if valid else [None] * self._n_hist
        ops = read_operands(r, [None, *hist])[1:]  # last: not read (c_last = 0)
        _, m, x_next = self.step_with_history(model_output, i, x, row, None, *ops,
                                              guidance_scale=guidance_scale)  # fmt: skip
        self._hist, self._prev_i = [m, *hist[:-1]], i
        return (x_next, self.x0_of(m, i, x)) if return_x0 else x_next

    def step_with_history(
        self,
        model_output: Tensor,
        i: int,
        x: Tensor,
        coef: Tensor,
        last: Tensor | None,
        m_prev: Tensor | None,
        m_prev2: Tensor | None,
        m_prev3: Tensor | None = None,
        *,
        guidance_scale: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One fused call with the caller's history and row (CUDA graphs): ``(x_c, m_i,
        x_next)``, m_i step i's noise estimate (LMS's d_i, iPNDM's e_i); ``last`` is not read
        (c_last = 0). The sampler's own history is left alone."""
        self._check_step_args(model_output, i, x, None, guidance_scale)
        return _unipc_ops().unipc_step(
            x,
            model_output,
            coef,
            None,
            m_prev,
            m_prev2,
            m_prev3=m_prev3,
            prediction_type=self._op_prediction(),
            guidance_scale=guidance_scale,
        )
