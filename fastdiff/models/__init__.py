"""Models built from fastdiff.nn: the DDPM / ADM UNet, its named presets, pretrained weights."""

from __future__ import annotations

from typing import Any

from fastdiff.models.presets import PRESETS
from fastdiff.models.unet import UNet, UNetBlock, UNetConfig

__all__ = ["PRESETS", "UNet", "UNetBlock", "UNetConfig", "load_pretrained"]


def __getattr__(name: str) -> Any:
    if name == "load_pretrained":  # imported on first use: it reads package data
        from fastdiff.models.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'fastdiff.models' has no attribute {name!r}")
