"""Pretrained weights in and out: peer checkpoints (open_clip, timm, torchvision) <-> our modules.

``core``: import / export / converted files and their check against a config; ``mappings``: the
table of named peer architectures and the per-tensor rules (docs/weights.md);
``tensor_io``: torch-free safetensors; ``export``: serialized ``jax.export`` encoders;
``sources``: converted files and run directories read shard by shard (no host replica) and
exported tensor by tensor; ``init``: ``config.init_from``. CLI: ``python -m contrastive_jax.convert --help``.
"""

from contrastive_jax.convert.core import (
    build_from_spec,
    check_against_model,
    export_state_dict,
    import_state_dict,
    load_converted,
    load_variables,
    read_metadata,
    save_converted,
)
from contrastive_jax.convert.mappings import FORMATS, MODELS, named_spec

__all__ = ["FORMATS", "MODELS", "build_from_spec", "check_against_model", "export_state_dict",
           "import_state_dict", "load_converted", "load_variables", "named_spec",
           "read_metadata", "save_converted"]
