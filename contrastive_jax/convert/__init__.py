"""Pretrained weights in and out: peer checkpoints (open_clip, timm, torchvision) <-> our modules.

``core``: import / export / converted files; ``mappings``: the per-tensor rules;
``tensor_io``: torch-free safetensors; ``export``: serialized ``jax.export`` encoders;
``sources``: converted files and run directories read shard by shard (no host replica) and
exported tensor by tensor; ``init``: ``config.init_from``. CLI: ``python -m contrastive_jax.convert --help``.
"""

from contrastive_jax.convert.core import (
    build_from_spec,
    export_state_dict,
    import_state_dict,
    load_converted,
    load_variables,
    save_converted,
)
from contrastive_jax.convert.mappings import FORMATS

__all__ = ["FORMATS", "build_from_spec", "export_state_dict", "import_state_dict",
           "load_converted", "load_variables", "save_converted"]
