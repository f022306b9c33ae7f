"""CLI: ``python -m contrastive_jax.convert {import,export,jax-export} ...``.

  # a peer checkpoint -> our converted file (safetensors with the architecture in its metadata)
  python -m contrastive_jax.convert import --format open_clip --activation quick_gelu \
      --input open_clip_model.safetensors --output clip_b32.safetensors
  # our converted file (or a run's workdir with --spec-from) -> the peer's state dict layout
  python -m contrastive_jax.convert export --format open_clip --input clip_b32.safetensors \
      --output back.safetensors
  # a tower as a serialized jax.export function (see convert/export.py for the calling convention)
  python -m contrastive_jax.convert jax-export --input clip_b32.safetensors --tower image \
      --output image_tower.jaxexport
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from contrastive_jax.convert import core, export, mappings, tensor_io


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
  exp = sub.add_parser("export", help="converted file -> peer state dict (.safetensors)")
  exp.add_argument("--format", required=True, choices=mappings.FORMATS)
  exp.add_argument("--input", required=True)
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
      spec, flat = core.load_converted(a.input)
      tensor_io.write_safetensors(a.output, core.export_state_dict(a.format, spec, flat))
      print(f"wrote {a.output} in the {a.format} layout")
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
