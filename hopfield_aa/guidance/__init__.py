"""Attention-space guidance for diffusers pipelines: GAG, PLADIS-style extrapolation and the Anderson-mixed
α-ladder as attention processors (UNet cross-attention, SD3/FLUX joint attention), on with one call, or
as a diffusers guider (:class:`GAGGuidance`) that composes with CFG in a guider-driven denoising loop.

>>> from hopfield_aa.guidance import enable_gag, disable_gag, gag_guidance
>>> handle = enable_gag(pipe, "gag", scale=1.0)  # doctest: +SKIP
>>> disable_gag(pipe)  # doctest: +SKIP
"""

from hopfield_aa.guidance.api import (
    GUIDANCE_PROCESSORS,
    GuidanceConfig,
    GuidanceHandle,
    attention_layers,
    disable_gag,
    enable_config,
    enable_gag,
    gag_guidance,
    guidance_handle,
)
from hopfield_aa.guidance.attention import guided_attention, guided_joint_attention
from hopfield_aa.guidance.guiders import GAGGuidance, denoise_with_guider, peer_guiders
from hopfield_aa.guidance.processors import GAGAttnProcessor, GAGFluxAttnProcessor, GAGJointAttnProcessor
from hopfield_aa.guidance.rules import (
    RULES,
    Rule,
    extrapolate_rule,
    gag_rule,
    get_rule,
    ladder_rule,
    register_rule,
)

__all__ = [
    "GUIDANCE_PROCESSORS",
    "RULES",
    "GAGAttnProcessor",
    "GAGFluxAttnProcessor",
    "GAGGuidance",
    "GAGJointAttnProcessor",
    "GuidanceConfig",
    "GuidanceHandle",
    "Rule",
    "attention_layers",
    "denoise_with_guider",
    "disable_gag",
    "enable_config",
    "enable_gag",
    "extrapolate_rule",
    "gag_guidance",
    "gag_rule",
    "get_rule",
    "guidance_handle",
    "guided_attention",
    "guided_joint_attention",
    "ladder_rule",
    "peer_guiders",
    "register_rule",
]
