"""Samplers: DDPM, DDIM, DPM-Solver++ 2M (each step is one fused op call)."""
