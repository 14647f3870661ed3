"""The MegEngine backend of reparam: native megengine.module layers built from reparam_core's
block descriptions (one generic RepModule, thin classes under the official names). Importing it
imports MegEngine with its CUDA-probing noise kept off stderr (quiet.py).

BN momentum is 0.9 in MegEngine's convention, which equals torch's momentum 0.1.
"""
from reparam_core import repconv_spec  # the YOLOv7 RepConv spec, re-exported

from .quiet import import_megengine, quiet_fd2

import_megengine()

from .api import build_block, create_model, export_state, load_state, model_from_spec, predict, reparameterize  # noqa: E402
from .blocks import RepConv, RepGhostBottleneck, RepGhostModule, RepModule, RepVGGBlock, RepVGGplusBlock, block_class  # noqa: E402
from .export import TracedGraph, export_traced, run_traced  # noqa: E402
from .fastrun import fastrun  # noqa: E402
from .layers import BN_MOMENTUM  # noqa: E402
from .models import RepGhostNet, RepVGG, RepVGGplus  # noqa: E402

__all__ = ["RepVGGBlock", "RepVGGplusBlock", "RepConv", "RepGhostModule", "RepGhostBottleneck",
           "RepVGG", "RepVGGplus", "RepGhostNet", "build_block", "create_model", "reparameterize",
           "load_state", "export_state", "predict", "export_traced", "run_traced", "repconv_spec",
           "model_from_spec", "BN_MOMENTUM", "quiet_fd2", "import_megengine", "RepModule",
           "block_class", "fastrun", "TracedGraph"]
