"""Attention blocks (each cites its paper), their placement in timm backbones, and a recorder."""

from fgvc.models.attention.cbam import CBAM, ChannelGate, SpatialGate
from fgvc.models.attention.common import IdentityStart
from fgvc.models.attention.gate import AttentionGate, GatedStage
from fgvc.models.attention.recorder import AttentionRecorder, GateRecord
from fgvc.models.attention.residual import ResidualAttention, SoftMask, mask_depth
from fgvc.models.attention.se import SqueezeExcite
from fgvc.models.attention.stn import SpatialTransformer

__all__ = ["CBAM", "ChannelGate", "SpatialGate", "IdentityStart", "AttentionGate", "GatedStage",
           "AttentionRecorder", "GateRecord", "ResidualAttention", "SoftMask", "mask_depth", "SqueezeExcite",
           "SpatialTransformer"]
