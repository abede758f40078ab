"""Backbones of the paper: ResNet50 v1/v2 (and v2 "(-)"), RevNet50 (and "(-)"), VGG19-BN.

``build_model`` returns a module whose forward gives a dict of endpoints; ``weight_decay_groups``
gives the optimizer groups; ``model_summary``/``format_summary`` describe a configuration.
"""

from ssltk.models.factory import build_backbone, build_model, weight_decay_groups
from ssltk.models.registry import arch_names, arch_traits, register_arch, unregister_arch
from ssltk.models.spec import ArchConfig
from ssltk.models.summary import SummaryRow, count_parameters, format_summary, model_summary

__all__ = [
    "ArchConfig",
    "SummaryRow",
    "arch_names",
    "arch_traits",
    "build_backbone",
    "build_model",
    "count_parameters",
    "format_summary",
    "model_summary",
    "register_arch",
    "unregister_arch",
    "weight_decay_groups",
]
