"""nn.Modules over fastdiff ops: the building blocks of fastdiff.models.UNet."""

from fastdiff.nn.attention import Attention
from fastdiff.nn.embedding import TimestepEmbedding, timestep_embedding
from fastdiff.nn.group_norm import GroupNormSiLU, fuse_group_norm_silu
from fastdiff.nn.resblock import ResBlock
from fastdiff.nn.sampling import Downsample, Upsample

__all__ = [
    "Attention",
    "Downsample",
    "GroupNormSiLU",
    "ResBlock",
    "TimestepEmbedding",
    "Upsample",
    "fuse_group_norm_silu",
    "timestep_embedding",
]
