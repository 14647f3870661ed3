"""Checkpoint files without frameworks, and the conversion between them; numpy and the standard
library only.

- `detect`: which format a file is in (`detect_format`, `format_from_extension`).
- `torch_zip`: PyTorch zip checkpoints, read and written (legacy non-zip pickles are refused).
- `megengine_pickle`: MegEngine pickles of numpy arrays, read and written.
- `flax_msgpack`: Flax msgpack files, read and written (msgpack imported on first use); orbax
  directories need JAX and are read by `backends.flax.orbax_io.read_orbax`, passed to `read_raw`.
- `safetensors_io`: a strict safetensors reader and writer.
- `pickle_safe`: the restricted unpickler the pickle-based formats read with.
- `atomic`: atomic file writes (temp file, fsync, rename).
- `tree`: nested checkpoint objects -> flat states (wrappers, `module.` prefixes).
- `read`: any file -> raw state (`read_raw`) -> neutral state (`to_neutral`, `load_neutral`).
- `write`: a neutral state -> any format (`encode`, streamed by `write_stream`).
- `convert`: the pipeline of `reparam convert` (read, key map, fuse, cast, atomic write, verify).
"""

from .detect import EXTENSIONS, FORMATS, detect_format, format_from_extension
from .read import DirectoryReader, flax_to_canonical_keys, infer_num_classes, load_neutral, read_raw, to_neutral
from .write import encode, write_stream

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "detect_format",
    "format_from_extension",
    "flax_to_canonical_keys",
    "DirectoryReader",
    "infer_num_classes",
    "load_neutral",
    "read_raw",
    "to_neutral",
    "encode",
    "write_stream",
]
