"""Zero-shot ImageNet of converted CLIP weights, one command (Radford et al. 2021, Sec. 3.1.4).

  python -m contrastive_jax.evaluate.zero_shot_imagenet --weights=clip_b32.safetensors \
      [--data_dir=gs://BUCKET/tensorflow_datasets] [--split=validation] [--batch_size=1024]

``--weights`` is a converted file (``python -m contrastive_jax.convert import ...``; with
``--convert_from=PEER_FILE --model=NAME``, the peer's model name such as ``ViT-B-32-quickgelu``,
this command converts it first and writes ``--weights``). The file's recorded architecture becomes a CLIP run config
(``weights_config``): the image tower, the text tower, the embedding size and the image size
from the file; CLIP BPE tokens (``data.bpe_vocab`` or the vocabulary an installed open_clip
ships); open_clip's eval transform (short side to the image size, bicubic, centre crop, CLIP
mean/std); tfds ``imagenet2012`` (prepared under ``--data_dir``, local or gs://).

The evaluation is the project's one zero-shot evaluator (``evaluate/runner.py``, type
``zero_shot`` with ``classes="imagenet"``, ``templates="clip"``: CLIP's 1,000 class names and
80 templates, prompt ensembling), so it is streamed and sharded over hosts as in training: each
host reads and encodes 1/P of the split and of the 80,000 prompts, and only hit counts are
summed. The weights are loaded with ``init_from`` (``convert/init.py``): FSDP placement
(``sharding.strategy="fsdp"``), each host reading only its devices' shards, so a ViT-bigG/14
(2.5B parameters) never sits whole on one host or one chip. Every parameter is frozen
(``optim.frozen_patterns``): no optimizer state is allocated.

Run it on every host of a pod, like the trainer (``jax.distributed.initialize()`` is called
when ``--multihost``). Prints the top-1 / top-5 and writes them as JSON (``--out``).
The figures open_clip publishes for each checkpoint are in docs/weights_at_scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from contrastive_jax import errors

EVAL_NAME = "imagenet"


def weights_config(spec: dict, weights: str, *, data_dir: str = "", split: str = "validation",
                   batch_size: int = 1024, templates: Any = "clip", bpe_vocab: str = "",
                   dataset: str = "imagenet2012") -> ml_collections.ConfigDict:
  """The CLIP run config of the architecture ``spec`` (a converted file's), loading ``weights``
  and declaring one zero-shot evaluator ``imagenet`` on ``dataset``/``split``."""
  from contrastive_jax.configs import common  # pylint: disable=g-import-not-at-top
  if spec.get("kind") != "clip":
    raise errors.ConfigError(f"{weights} holds a {spec.get('kind')!r} model; zero-shot needs a "
                             "CLIP (image and text towers): convert an open_clip checkpoint")
  c = common.base_config()
  c.method = "clip"
  c.global_batch = batch_size
  c.total_steps = 1
  c.model = ml_collections.ConfigDict(dict(name=spec["image_model"],
                                           kwargs=dict(spec["image_kwargs"])))
  text = dict(spec["text_kwargs"])
  c.text = ml_collections.ConfigDict(dict(kwargs=text))
  c.clip = common.clip_config("clip", embed_dim=int(spec["embed_dim"]))
  c.data = common.data_config(
      "tfds", name=dataset, eval_split=split, train_split=split, data_dir=data_dir,
      recipe="clip", image_size=int(spec["image_size"]), tokenizer="clip_bpe",
      bpe_vocab=bpe_vocab, context_length=int(text["context_length"]), cache=False)
  # Evaluation only: every parameter frozen (the empty pattern matches every path), so the
  # optimizer holds no state at all.
  c.optim = common.optim_config("sgd", base_lr=1e-3, lr_scaling="none", frozen_patterns=("",))
  c.sharding.strategy = "fsdp"
  c.init_from.path = weights
  c.eval.evaluators = {EVAL_NAME: dict(type="zero_shot", classes="imagenet",
                                       templates=templates, batch_size=batch_size)}
  return c


def evaluate_weights(weights: str, **kwargs: Any) -> dict[str, float]:
  """Zero-shot top-1 / top-5 (fractions) of the converted file ``weights`` (``weights_config``
  keywords); every process of a multi-host run calls it."""
  from contrastive_jax import runs  # pylint: disable=g-import-not-at-top
  from contrastive_jax.convert import init as init_lib  # pylint: disable=g-import-not-at-top
  from contrastive_jax.evaluate import runner  # pylint: disable=g-import-not-at-top
  source = init_lib.open_source(weights)
  if source.kind != "converted":
    raise errors.ConfigError(f"--weights={weights!r} must be a converted .safetensors file")
  config = weights_config(source.spec, weights, **kwargs)
  run = runs.build_run(config, num_steps=1)
  state = init_lib.init_state(run)
  evaluators = runner.Runner(config, run.method, run.mesh)
  results = evaluators.run(state, [EVAL_NAME])
  return {k.split("/", 1)[1]: float(v) for k, v in results.items()}  # "imagenet/top1" -> "top1"


def convert_first(peer_file: str, model: str, weights: str) -> None:
  """``convert import --model`` of ``peer_file`` into ``weights`` on process 0; the others
  wait."""
  import jax  # pylint: disable=g-import-not-at-top
  from contrastive_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    argv = ["import", "--model", model, "--input", peer_file, "--output", weights]
    if convert_cli.main(argv) != 0:
      raise errors.ConfigError(f"converting {peer_file} failed (message above)")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("zero_shot_imagenet: converted")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m contrastive_jax.evaluate.zero_shot_imagenet",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--weights", required=True, help="converted CLIP .safetensors")
  p.add_argument("--convert_from", default="",
                 help="peer checkpoint to convert into --weights first (with --model)")
  p.add_argument("--model", default="",
                 help="the peer's model name of --convert_from (e.g. ViT-B-32-quickgelu for "
                 "OpenAI's weights; `python -m contrastive_jax.convert models` lists them)")
  p.add_argument("--data_dir", default="", help="tfds data_dir holding imagenet2012")
  p.add_argument("--dataset", default="imagenet2012",
                 help="tfds name with ImageNet's labels (imagenet_v2, imagenet_sketch, ...)")
  p.add_argument("--split", default="validation", help="tfds split, e.g. validation[:10000]")
  p.add_argument("--batch_size", type=int, default=1024,
                 help="global batch (a multiple of the device count)")
  p.add_argument("--templates", default="clip",
                 help="'clip' (the 80 templates) or templates separated by '|' with '{}'")
  p.add_argument("--bpe_vocab", default="", help="CLIP BPE vocabulary (default: open_clip's)")
  p.add_argument("--multihost", action="store_true",
                 help="call jax.distributed.initialize() (every host of a pod runs this)")
  p.add_argument("--out", default="", help="write the result as JSON here (process 0)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; a user error prints its message and returns ``errors.EXIT_CODE``."""
  args = parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data
  except RuntimeError:
    pass
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  if args.multihost:
    jax.distributed.initialize()
  templates = "clip" if args.templates == "clip" else tuple(args.templates.split("|"))
  try:
    if args.convert_from:
      if not args.model:
        raise errors.ConfigError("--convert_from needs --model NAME, the peer's model name, "
                                 "which fixes heads, activation and norms (e.g. "
                                 "ViT-B-32-quickgelu for OpenAI's weights)")
      convert_first(args.convert_from, args.model, args.weights)
    res = evaluate_weights(args.weights, data_dir=args.data_dir, split=args.split,
                           batch_size=args.batch_size, templates=templates,
                           bpe_vocab=args.bpe_vocab, dataset=args.dataset)
  except (errors.UserError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return errors.EXIT_CODE
  if jax.process_index() == 0:
    line = ", ".join(f"{k} {100 * v:.2f}%" for k, v in sorted(res.items()))
    print(f"zero-shot {args.dataset}/{args.split} of {args.weights}: {line}")
    if args.out:
      from etils import epath  # pylint: disable=g-import-not-at-top
      epath.Path(args.out).write_text(json.dumps(
          {"weights": args.weights, "dataset": args.dataset, "split": args.split,
           "templates": args.templates, "results": res}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
