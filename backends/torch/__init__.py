"""PyTorch backend of reparam: native torch.nn blocks and models built from reparam_core specs.

One generic module class (RepModule) built from reparam_core's block description, with thin
named classes per official class. Module paths (and so `state_dict()` keys) are the canonical,
official names; every fusion goes through reparam_core.blocks.fuse (float64).
"""

from reparam_core import repconv_spec  # the YOLOv7 RepConv spec, re-exported

from .api import export_state, load_state, predict, reparameterize
from .blocks import (
    RepConv,
    RepGhostBottleneck,
    RepGhostModule,
    RepModule,
    RepVGGBlock,
    RepVGGplusBlock,
    block_class,
    build_block,
)
from .export import export_onnx
from .graph_fuse import FuseReport, fuse
from .layers import SqueezeExcite
from .models import RepGhostNet, RepVGG, RepVGGplus, create_model, empty_model

__all__ = [
    "RepVGGBlock",
    "RepVGGplusBlock",
    "RepConv",
    "RepGhostModule",
    "RepGhostBottleneck",
    "RepVGG",
    "RepVGGplus",
    "RepGhostNet",
    "RepModule",
    "SqueezeExcite",
    "block_class",
    "build_block",
    "create_model",
    "empty_model",
    "reparameterize",
    "load_state",
    "export_state",
    "predict",
    "export_onnx",
    "repconv_spec",
    "fuse",
    "FuseReport",
]
