"""Diff-ST denoiser network (Wang et al., MICCAI 2024): histology encoder, CAM, CIGC, U-Net.

``build_model(config) -> DiffSTDenoiser``; ``model(x_t, t, cond) -> (out, aux)``. See docs/model.md.
"""
from __future__ import annotations

from .adversarial import GeneDiscriminator
from .align import SpatialAlign
from .denoiser import DEFAULT_CONFIG, DiffSTDenoiser, build_model, default_config
from .features import (HandcraftedFeatures, FileFeatures, available_feature_extractors, make_feature_extractor,
                       register_feature_extractor)
from .gene_graph import GeneGraph, coexpression_matrix, normalized_adjacency
from .histology import HistologyEncoder, patch_entropy
from .modulation import CrossModalModulation, disentangle_loss

__all__ = [
    "build_model", "DiffSTDenoiser", "default_config", "DEFAULT_CONFIG",
    "coexpression_matrix", "normalized_adjacency", "GeneGraph",
    "HistologyEncoder", "patch_entropy", "CrossModalModulation", "disentangle_loss",
    "SpatialAlign", "GeneDiscriminator", "HandcraftedFeatures", "FileFeatures", "available_feature_extractors",
    "make_feature_extractor", "register_feature_extractor",
]
