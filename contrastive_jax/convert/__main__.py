"""CLI: ``python -m contrastive_jax.convert {import,export,jax-export} ...``.

  # a peer checkpoint -> our converted file (safetensors with the architecture in its metadata)
  python -m contrastive_jax.convert import --format open_clip --activation quick_gelu \
      --input open_clip_model.safetensors --output clip_b32.safetensors
  # our converted file -> the peer's state dict layout
  python -m contrastive_jax.convert export --format open_clip --input clip_b32.safetensors \
      --output back.safetensors
  # a run's newest checkpoint (FSDP or not) -> the peer's layout; the architecture comes from
  # a converted file of the same model (e.g. the one the run started from)
  python -m contrastive_jax.convert export --format open_clip --input /tmp/lit_b32 \
      --spec-from clip_b32.safetensors --output lit_b32_open_clip.safetensors
  # a tower as a serialized jax.export function (see convert/export.py for the calling convention)
  python -m contrastive_jax.convert jax-export --input clip_b32.safetensors --tower image \
      --output image_tower.jaxexport
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from contrastive_jax.convert import core, export, mappings, sources, tensor_io


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m contrastive_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  imp = sub.add_parser("import", help="peer checkpoint -> converted file")
  imp.add_argument("--format", required=True, choices=mappings.FORMATS)
  imp.add_argument("--input", required=True,
                   help=".safetensors, .npz, or .bin/.pt/.pth (torch installed)")
  imp.add_argument("--output", required=True, help="converted .safetensors")
  imp.add_argument("--activation", choices=("gelu", "quick_gelu"),
                   help="open_clip: quick_gelu for OpenAI weights and '-quickgelu' models")
  exp = sub.add_parser("export", help="converted file or run directory -> peer state dict "
                       "(.safetensors), one tensor in memory at a time")
  exp.add_argument("--format", required=True, choices=mappings.FORMATS)
  exp.add_argument("--input", required=True,
                   help="a converted .safetensors, or a run's workdir (its newest checkpoint)")
  exp.add_argument("--spec-from", dest="spec_from",
                   help="converted file whose architecture the run in --input has (needed for "
                   "a run directory; default: --input's own)")
  exp.add_argument("--output", required=True)
  jx = sub.add_parser("jax-export", help="converted file -> serialized jax.export tower")
  jx.add_argument("--input", required=True)
  jx.add_argument("--tower", required=True, choices=("image", "text"))
  jx.add_argument("--output", required=True)
  jx.add_argument("--platforms", default="cpu", help="comma-separated: cpu,cuda,tpu")
  a = p.parse_args(argv)
  try:
    if a.cmd == "import":
      sd, _ = tensor_io.read_tensors(a.input)
      spec, flat = core.import_state_dict(a.format, sd, activation=a.activation)
      core.save_converted(a.output, spec, flat, a.format)
      print(f"wrote {a.output}: {len(flat)} tensors, spec {spec}")
    elif a.cmd == "export":
      source = sources.open_source(a.input)
      if a.spec_from:
        spec_file = sources.open_source(a.spec_from)
        if spec_file.kind != "converted":
          raise ValueError(f"--spec-from={a.spec_from!r} must be a converted file (its metadata "
                           "holds the architecture)")
        spec = spec_file.spec
      elif source.kind == "converted":
        spec = source.spec
      else:
        raise ValueError(f"--input={a.input!r} is a run directory: its checkpoint holds tensors, "
                         "not the architecture; add --spec-from=CONVERTED.safetensors of the "
                         "same model (e.g. the file the run started from)")
      n = sources.export_to_peer(a.format, spec, source, a.output)
      print(f"wrote {a.output}: {n} tensors in the {a.format} layout")
    else:
      spec, flat = core.load_converted(a.input)
      variables = core.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
      exported = export.export_tower(spec, variables, a.tower, a.output,
                                     platforms=a.platforms.split(","))
      print(f"wrote {a.output}: {exported.in_avals} -> {exported.out_avals}")
  except (ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
