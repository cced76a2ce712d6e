"""M2DINO: DINOv3 backbone (timm), task-conditioned Mixture-of-Experts blocks and task heads."""

from usagg.model.backbone import BackboneFeatures, DinoBackbone
from usagg.model.m2dino import M2DINO, build_model
from usagg.model.pretrained import LoadReport, load_pretrained

__all__ = ["M2DINO", "BackboneFeatures", "DinoBackbone", "LoadReport", "build_model", "load_pretrained"]
