"""Backbones of the paper (§3): ResNet50 v1/v2 (and v2 "(-)"), RevNet50 (and "(-)"), VGG19-BN.

``build_model`` returns a module whose forward gives a dict of endpoints; ``weight_decay_groups``
gives the optimizer groups; ``model_summary``/``format_summary`` describe a configuration.
"""

from ssltk.models.factory import build_model, weight_decay_groups
from ssltk.models.spec import ARCHS, ArchConfig
from ssltk.models.summary import SummaryRow, count_parameters, format_summary, model_summary

__all__ = [
    "ARCHS",
    "ArchConfig",
    "SummaryRow",
    "build_model",
    "count_parameters",
    "format_summary",
    "model_summary",
    "weight_decay_groups",
]
