"""reparam_core: framework-free structural re-parameterization (numpy only).

The fusion algebra, kernel layouts, architecture specs, the neutral state and the float64
oracle. Never imports a deep-learning framework; runs on Python 3.10 + numpy 1.26 and on
Python 3.11 + numpy 2.
"""
from .counting import count_macs, count_params, count_params_folded
from .equivalent import ghost_cheap_kernel_bias, repblock_kernel_bias, reparameterize_state
from .errors import (BackendUnavailableError, CheckpointError, FusionError, ReparamError,
                     ShapeMismatchError, UnknownModelError, UnsafeFileError)
from .schema import (FORMS, Form, TensorInfo, block_schema, detect_form, repblock_names,
                     schema_for, state_schema)
from .specs import (BlockSpec, ModelSpec, RepBlockSpec, RepGhostBottleneckSpec, RepGhostModuleSpec,
                    RepGhostNetSpec, RepVGGSpec, block_kind, block_spec_from_dict,
                    block_spec_to_dict, get_spec, list_models, repconv_spec, repvgg_spec)
from .state import check_state, random_state, random_tensors, strip_ignored

__version__ = "0.1.0"

__all__ = [
    "count_macs", "count_params", "count_params_folded", "ghost_cheap_kernel_bias",
    "repblock_kernel_bias", "reparameterize_state", "BackendUnavailableError", "CheckpointError",
    "FusionError", "ReparamError", "ShapeMismatchError", "UnknownModelError", "UnsafeFileError",
    "FORMS", "Form", "TensorInfo", "block_schema", "detect_form", "repblock_names", "state_schema", "ModelSpec",
    "RepBlockSpec", "RepGhostBottleneckSpec", "RepGhostModuleSpec", "RepGhostNetSpec",
    "RepVGGSpec", "get_spec", "list_models", "BlockSpec", "block_spec_from_dict",
    "block_spec_to_dict", "block_kind", "repconv_spec", "repvgg_spec", "schema_for", "check_state", "random_state", "random_tensors", "strip_ignored",
]
