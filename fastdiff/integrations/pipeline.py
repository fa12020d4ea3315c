"""``fastdiff.optimize(pipe)`` on a diffusers pipeline: each of its diffusers models optimized in
place, and the per-component report."""

from __future__ import annotations

from typing import Any


class PipelineReport(dict):
    """``optimize(pipe)``'s report: ``{component name: OptimizeReport}``, and ``.left``, the
    components left alone with the reason."""

    def __init__(self) -> None:
        super().__init__()
        self.left: list[tuple[str, str]] = []

    def __str__(self) -> str:
        lines = [f"{name}: {report}" for name, report in self.items()]
        lines += [f"left {name}: {why}" for name, why in self.left]
        return "\n".join(lines)

    __repr__ = __str__


def _pipeline_components(pipe: Any) -> dict[str, Any] | None:
    comps = getattr(pipe, "components", None)
    return comps if isinstance(comps, dict) and comps else None


def _optimize_pipeline(pipe: Any, channels_last: bool | None) -> Any:
    """Optimize each diffusers model of a pipeline in place (see :func:`optimize`)."""
    from fastdiff.integrations.diffusers import optimize

    try:
        from diffusers import ModelMixin
    except ImportError as exc:
        raise TypeError(
            f"optimize: {type(pipe).__name__} has components but diffusers is not importable "
            f"({exc}); optimize a torch.nn.Module, or install diffusers"
        ) from exc

    report = PipelineReport()
    for name, comp in _pipeline_components(pipe).items():
        comp = getattr(comp, "_orig_mod", comp)  # torch.compile's wrapper: the model inside
        if isinstance(comp, ModelMixin):  # not a text encoder or a (CLIP) safety checker
            report[name] = optimize(comp, channels_last=channels_last).fastdiff_report
        elif comp is not None:
            report.left.append((name, f"{type(comp).__name__}: not a diffusers model"))
    pipe.fastdiff_report = report
    return pipe
