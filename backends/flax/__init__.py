"""Flax (NNX) backend of reparam: native nnx modules built from reparam_core's block
descriptions.

One generic module (`RepModule`) builds and interprets any description; the named classes are
thin subclasses checked against the spec's kind. Attribute paths mirror the canonical names: the
NNX state path of each tensor joined with "." is reparam_core.weights.layouts.flax_key(canonical key).
Every layout conversion goes through reparam_core.weights.layouts and every fusion through
reparam_core.blocks.fuse (float64). Activations are NHWC inside; `predict` and the exported artifact
take NCHW.
"""

from reparam_core import repconv_spec  # the YOLOv7 RepConv spec, re-exported

from .api import export_state, inference_view, load_native_state, load_state, native_state, predict, reparameterize
from .blocks import (
    RepConv,
    RepGhostBottleneck,
    RepGhostModule,
    RepModule,
    RepVGGBlock,
    RepVGGplusBlock,
    block_class,
    build_block,
    empty_block,
)
from .export import export_stablehlo, load_stablehlo
from .layers import BatchNorm, SqueezeExcite
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
    "BatchNorm",
    "block_class",
    "build_block",
    "empty_block",
    "create_model",
    "empty_model",
    "reparameterize",
    "load_state",
    "export_state",
    "predict",
    "native_state",
    "load_native_state",
    "inference_view",
    "export_stablehlo",
    "load_stablehlo",
    "repconv_spec",
]
