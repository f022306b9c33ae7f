"""The rehearsal's fast parts (``contrastive_jax.tools.rehearsal`` and ``rehearse``): the
rehearsal config keeps every architecture key of each full-scale config, shrinks only sizes,
says what it changed and could not rehearse, and writes image-text data that the real pipeline
reads (corrupt records skipped, the tiny SentencePiece model's vocabulary). The rehearsals
themselves run in CI's second step (scripts/rehearse.sh): the real architectures compile for
minutes, beyond this suite's budget."""

from __future__ import annotations

import numpy as np
import pytest

from contrastive_jax import configs
from contrastive_jax.data import clip_bpe, pipeline
from contrastive_jax.errors import ConfigError
from contrastive_jax.tools import local_pod, rehearsal, rehearse

FULL_SCALE = ("simclr_resnet50_imagenet", "mocov2_resnet50_imagenet", "mocov3_resnet50_imagenet",
              "mocov3_vit_base_imagenet", "clip_vit_b32", "siglip_vit_b16", "lit_vit_b32")
# The only keys a rehearsal may change (sizes, paths, run length, logging).
SHRINKABLE = {"global_batch", "total_steps", "total_epochs", "log_every", "checkpoint.every_steps",
              "data.image_size", "data.shuffle_buffer", "data.cycle_length", "data.path",
              "data.spm_model", "data.data_dir", "optim.warmup_steps", "text.kwargs.vocab_size",
              "moco.schedule_steps", "eval.enabled", "init_from.path"}


# Full-scale configs this 24 GiB machine cannot rehearse at their real architecture, and why.
NOT_REHEARSABLE = {
    "clip_vit_bigg14": "2.54B parameters: float32 weights, AdamW moments and gradients are about "
                       "30 GB even split over 2 processes; compiled for its pod instead "
                       "(tests/test_compile_for.py, python -m contrastive_jax.compile_for)",
}


def test_scripts_rehearse_every_full_scale_config():
  text = open("scripts/rehearse.sh").read()
  for name in FULL_SCALE:
    assert name in text
  full_scale = {n for n in configs.names() if not n.endswith(("_mnist", "_cifar10"))}
  assert full_scale == set(FULL_SCALE) | set(NOT_REHEARSABLE), (
      "a new full-scale config needs its rehearsal (or, if it cannot run on the CI machine, "
      "an entry in NOT_REHEARSABLE with the reason)")


@pytest.mark.parametrize("name", FULL_SCALE)
def test_derive_keeps_architecture_and_shrinks_only_sizes(name, tmp_path):
  real = configs.load_config(f"configs/{name}.py")
  if real.data.tokenizer == "clip_bpe" and not clip_bpe.default_vocab_path():
    pytest.skip("CLIP's BPE vocabulary ships with open_clip (requirements-test.txt)")
  plan = rehearsal.derive(real, spec=name, data_dir=str(tmp_path))
  flat_real = rehearsal._flatten(real.to_dict())
  flat = rehearsal._flatten(plan.config.to_dict())
  changed = {k for k in flat if flat[k] != flat_real.get(k)}
  assert changed <= SHRINKABLE, changed - SHRINKABLE
  assert changed == {k for k, _, _ in plan.shrunk}
  for key in flat_real:  # every architecture key is the real one
    if key.startswith(("model.", "head.", "predictor.", "clip.", "loss.", "text.")) and \
        key != "text.kwargs.vocab_size":
      assert flat[key] == flat_real[key], key
  assert plan.config.global_batch == 8 and plan.config.total_steps == 4
  assert plan.config.total_epochs is None and not plan.config.eval.enabled
  table = rehearsal.format_table(plan)
  for heading in ("SHRUNK", "REAL", "NOT REHEARSED", "gloo"):
    assert heading in table
  assert f"{real.global_batch} -> 8" in table.replace("  ", " ").replace("  ", " ")
  if real.data.source == "tfrecord":
    assert plan.config.data.path.startswith(str(tmp_path))
  if real.data.tokenizer == "sentencepiece":
    assert plan.config.text.kwargs.vocab_size == rehearsal.SPM_PIECES + 3
    assert "not architecture" in table
  if real.init_from.path:  # a stand-in of the real architecture replaces the weights file
    assert plan.config.init_from.path.startswith(str(tmp_path))
    assert "pretrained weights" in table
  # The shorter run is a valid run: warmup shorter than it.
  from contrastive_jax import optim
  assert optim.resolve_warmup_steps(plan.config.optim, 4) < 4


def test_derive_refuses_sizes_that_cannot_run():
  real = configs.load_config("configs/clip_vit_b32.py")
  with pytest.raises(ConfigError, match="divisible"):
    rehearsal.derive(real, batch=6)
  with pytest.raises(ConfigError, match="--steps"):
    rehearsal.derive(real, steps=3, checkpoint_every=2)


def test_image_text_data_reads_through_the_real_pipeline(tmp_path):
  real = configs.load_config("configs/siglip_vit_b16.py")
  plan = rehearsal.derive(real, data_dir=str(tmp_path))
  written = rehearsal.write_data(plan, str(tmp_path))
  assert len(written["tfrecord_files"]) == rehearsal.TFRECORD_SHARDS
  c = plan.config.data
  tok = pipeline.make_tokenizer(c)
  assert tok.vocab_size == plan.config.text.kwargs.vocab_size
  assert pipeline.split_size(c, "train") == rehearsal.TFRECORD_EXAMPLES  # from the index
  it = pipeline.train_iterator(c, mode="image_text", global_batch=16, seed=0, process_index=0,
                               process_count=1)
  for _ in range(3):  # more than an epoch: every corrupt record is met
    batch = next(it)
  assert batch["image"].shape == (16, 32, 32, 3)
  assert batch["tokens"].shape == (16, 64) and batch["tokens"].max() < tok.vocab_size
  assert it.stats["corrupt_skipped"] >= 1
  assert np.isfinite(batch["image"]).all()


def test_warns_when_delayed_acks_on_loopback_would_stall_the_pod(monkeypatch, capsys):
  # What `ip route get 127.0.0.1` prints without and with `quickack 1` on the loopback route.
  delayed = "local 127.0.0.1 dev lo src 127.0.0.1 uid 0 \n    cache <local> \n"
  quick = "local 127.0.0.1 dev lo src 127.0.0.1 uid 0 \n    cache <local> quickack 1 \n"
  assert local_pod.loopback_warning(2, 2, quick) is None
  assert local_pod.loopback_warning(2, 1, delayed) is None  # links carry data both ways
  assert local_pod.loopback_warning(1, 4, delayed) is None  # no gloo
  assert "no `ip` command" in local_pod.loopback_warning(2, 2, None)
  spec = "configs/simclr_resnet50_imagenet.py"
  monkeypatch.setattr(local_pod, "loopback_route", lambda: delayed)
  assert rehearse.main([spec, "--plan_only"]) == 0  # 2 processes x 2 devices by default
  err = capsys.readouterr().err
  assert "WARNING: delayed ACKs are on" in err and local_pod.QUICKACK_COMMAND in err
  assert rehearse.main([spec, "--plan_only", "--devices", "1"]) == 0
  assert "WARNING" not in capsys.readouterr().err
  monkeypatch.setattr(local_pod, "loopback_route", lambda: quick)
  assert rehearse.main([spec, "--plan_only"]) == 0
  assert "WARNING" not in capsys.readouterr().err
