"""reparam_core: framework-free structural re-parameterization (numpy only).

The fusion algebra, the block description (nodes) and its rules (schema, fusion, oracle,
counts), the families as data, kernel layouts, the neutral state and the float64 oracle. Never
imports a deep-learning framework; runs on Python 3.10 + numpy 1.26 and on Python 3.11 + numpy 2.
"""
from .counting import count_macs, count_params, count_params_folded
from .errors import (
    BackendUnavailableError,
    CheckpointError,
    FusionError,
    ReparamError,
    ShapeMismatchError,
    SpecError,
    UnknownModelError,
    UnsafeFileError,
)
from .fuse import block_kernel_bias, iter_deploy_state, rep_kernel_bias, reparameterize_state
from .nodes import (
    BN,
    SE,
    Act,
    Add,
    Aux,
    AvgPool,
    Block,
    Conv,
    Description,
    Dropout,
    Flatten,
    GlobalPool,
    Linear,
    Model,
    PadBN,
    Rep,
    Scale,
    describe,
    in_form,
    to_deploy,
)
from .official import official_block, official_classes
from .schema import FORMS, Form, TensorInfo, block_schema, detect_form, schema_for, schema_of, state_schema
from .specs import (
    BlockSpec,
    ModelSpec,
    RepBlockSpec,
    RepGhostBottleneckSpec,
    RepGhostModuleSpec,
    RepGhostNetSpec,
    RepVGGSpec,
    block_kind,
    block_spec_from_dict,
    block_spec_to_dict,
    get_spec,
    list_models,
    repconv_spec,
    repvgg_spec,
)
from .state import check_state, random_state, random_tensors, strip_ignored

__version__ = "0.1.0"

__all__ = [
    "count_macs", "count_params", "count_params_folded", "BackendUnavailableError",
    "CheckpointError", "FusionError", "ReparamError", "ShapeMismatchError", "SpecError",
    "UnknownModelError", "UnsafeFileError", "block_kernel_bias", "iter_deploy_state",
    "rep_kernel_bias", "reparameterize_state", "BN", "SE", "Act", "Add", "AvgPool", "Aux",
    "Block", "Conv", "Description", "Dropout", "Flatten", "GlobalPool", "Linear", "Model",
    "PadBN", "Rep", "Scale", "describe", "in_form", "to_deploy", "FORMS", "Form", "TensorInfo",
    "block_schema", "detect_form", "schema_for", "schema_of", "state_schema", "BlockSpec",
    "ModelSpec", "RepBlockSpec", "RepGhostBottleneckSpec", "RepGhostModuleSpec",
    "RepGhostNetSpec", "RepVGGSpec", "block_kind", "block_spec_from_dict", "block_spec_to_dict",
    "get_spec", "list_models", "repconv_spec", "repvgg_spec", "check_state", "random_state",
    "random_tensors", "strip_ignored", "official_block", "official_classes",
]
