"""CLI: ``python -m contrastive_jax.convert {import,export,upgrade,jax-export,models} ...``.

  # a peer checkpoint -> our converted file; the peer's model name fixes the architecture
  # (head width, MLP ratio, activation, ...): OpenAI's weights are the '-quickgelu' names
  python -m contrastive_jax.convert import --model ViT-B-32-quickgelu \
      --input open_clip_model.safetensors --output clip_b32.safetensors
  # our converted file -> the peer's state dict layout (the format recorded in the file)
  python -m contrastive_jax.convert export --input clip_b32.safetensors --output back.safetensors
  # a file of the older format (no model name recorded) -> the current format, checked
  python -m contrastive_jax.convert upgrade --model ViT-H-14 --input old.safetensors \
      --output new.safetensors
  # a run's newest checkpoint (FSDP or not) -> the peer's layout; the architecture comes from
  # a converted file of the same model (e.g. the one the run started from)
  python -m contrastive_jax.convert export --input /tmp/lit_b32 \
      --spec-from clip_b32.safetensors --output lit_b32_open_clip.safetensors
  # a tower as a serialized jax.export function (see convert/export.py for the calling convention)
  python -m contrastive_jax.convert jax-export --input clip_b32.safetensors --tower image \
      --output image_tower.jaxexport
  # the supported names and the refused families (docs/weights.md)
  python -m contrastive_jax.convert models
"""

from __future__ import annotations

import argparse
import json
import sys

import jax.numpy as jnp
from etils import epath

from contrastive_jax.convert import core, export, mappings, sources, tensor_io


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m contrastive_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  imp = sub.add_parser("import", help="peer checkpoint -> converted file")
  imp.add_argument("--model", help="the peer's model name: open_clip's ViT-H-14, "
                   "ViT-B-32-quickgelu, ...; timm's vit_base_patch16_224, ...; resnet50 "
                   "(torchvision); `models` lists them")
  imp.add_argument("--spec", help="instead of --model: a JSON file with the complete "
                   "architecture of a model outside the table (convert.mappings.named_spec's "
                   "layout, with peer.format)")
  imp.add_argument("--input", required=True,
                   help=".safetensors, .npz, or .bin/.pt/.pth (torch installed)")
  imp.add_argument("--output", required=True, help="converted .safetensors")
  # The older interface: the format and activation are now fixed by --model.
  imp.add_argument("--format", help=argparse.SUPPRESS)
  imp.add_argument("--activation", help=argparse.SUPPRESS)
  exp = sub.add_parser("export", help="converted file or run directory -> peer state dict "
                       "(.safetensors), one tensor in memory at a time")
  exp.add_argument("--format", choices=mappings.FORMATS,
                   help="default: the format recorded in the converted file")
  exp.add_argument("--input", required=True,
                   help="a converted .safetensors, or a run's workdir (its newest checkpoint)")
  exp.add_argument("--spec-from", dest="spec_from",
                   help="converted file whose architecture the run in --input has (needed for "
                   "a run directory; default: --input's own)")
  exp.add_argument("--output", required=True)
  up = sub.add_parser("upgrade", help="converted file of the older format -> current format")
  up.add_argument("--model", help="the peer's model name, as for import")
  up.add_argument("--spec", help="instead of --model: a JSON architecture, as for import")
  up.add_argument("--input", required=True)
  up.add_argument("--output", required=True)
  jx = sub.add_parser("jax-export", help="converted file -> serialized jax.export tower")
  jx.add_argument("--input", required=True)
  jx.add_argument("--tower", required=True, choices=("image", "text"))
  jx.add_argument("--output", required=True)
  jx.add_argument("--platforms", default="cpu", help="comma-separated: cpu,cuda,tpu")
  sub.add_parser("models", help="list the supported peer model names")
  a = p.parse_args(argv)
  try:
    if a.cmd == "import":
      if a.activation or a.format or not (a.model or a.spec):
        raise ValueError("import takes the peer's model name, which fixes the format, the "
                         "activation and the head count: --model NAME (e.g. ViT-B-32-quickgelu "
                         "for OpenAI's weights, ViT-B-32 for LAION's); `python -m "
                         "contrastive_jax.convert models` lists the names")
      sd, _ = tensor_io.read_tensors(a.input)
      custom = json.loads(epath.Path(a.spec).read_text()) if a.spec else None
      spec, flat = core.import_state_dict(sd, a.model, spec=custom)
      core.save_converted(a.output, spec, flat)
      peer = spec["peer"].get("model", "a custom model")
      print(f"wrote {a.output}: {len(flat)} tensors of {peer}")
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
      fmt = a.format or (spec.get("peer") or {}).get("format")
      if not fmt:
        raise ValueError("the converted file records no peer format (older format); pass "
                         "--format or upgrade it: python -m contrastive_jax.convert upgrade")
      n = sources.export_to_peer(fmt, spec, source, a.output)
      print(f"wrote {a.output}: {n} tensors in the {fmt} layout")
    elif a.cmd == "upgrade":
      if bool(a.model) == bool(a.spec):
        raise ValueError("upgrade needs --model NAME (or --spec arch.json), the architecture "
                         "the file's weights were trained with")
      meta = core.read_metadata(a.input)
      custom = json.loads(epath.Path(a.spec).read_text()) if a.spec else None
      target = custom or mappings.named_spec(a.model)
      fmt = target["peer"]["format"]
      if meta["format"] and meta["format"] != fmt:
        raise ValueError(f"{a.input} holds {meta['format']} weights, not {fmt}")
      spec, flat = core.load_converted(a.input)
      # Back to the peer's layout (exact: transposes and reshapes only) and imported again, so
      # the file is checked against the architecture as an import is.
      peer_sd = core.export_state_dict(fmt, spec, flat)
      new_spec, new_flat = core.import_state_dict(peer_sd, a.model, spec=custom)
      core.save_converted(a.output, new_spec, new_flat)
      print(f"wrote {a.output}: {len(new_flat)} tensors of {new_spec['peer'].get('model')} "
            f"(file version {meta['version'] or 1} -> {core.FILE_VERSION})")
    elif a.cmd == "jax-export":
      if not core.read_metadata(a.input)["version"]:
        raise ValueError(f"{a.input} is of the older format, whose head count may have been "
                         "guessed wrong; upgrade it first: python -m contrastive_jax.convert "
                         f"upgrade --model NAME --input {a.input} --output NEW.safetensors")
      spec, flat = core.load_converted(a.input)
      variables = core.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
      exported = export.export_tower(spec, variables, a.tower, a.output,
                                     platforms=a.platforms.split(","))
      print(f"wrote {a.output}: {exported.in_avals} -> {exported.out_avals}")
    else:
      for name, fmt in mappings.MODELS.items():
        print(f"{fmt:20s} {name}")
  except (ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
