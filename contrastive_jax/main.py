"""Command line entry point: flags, distributed initialisation, then ``train.train_and_evaluate``.

  python -m contrastive_jax.main --config=configs/simclr_mnist.py[:args] \
      [--config.key=value ...] --workdir=DIR

``configs/NAME.py`` is the packaged ``contrastive_jax/configs/NAME.py`` (see
``contrastive_jax.configs.resolve``); ``--config.key=None`` resets an optional number.

Multi-host: on Cloud TPU pods (and SLURM) jax finds the cluster itself (``--multihost``); on
CPU machines pass ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (see
``launch/local_multiprocess.sh``). ``--heartbeat_timeout_s`` bounds how long the other
processes keep running after one has died. Re-running the same command resumes from ``DIR``'s
latest good checkpoint (see launch/README.md for automatic restarts on spot machines).
"""

from __future__ import annotations

import errno
import os
import sys

from absl import app, flags
from absl import logging
from ml_collections import config_flags

from contrastive_jax import configs, errors

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = flags.FLAGS
configs.accept_none_overrides()
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (local path or gs://...).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with auto-detection "
                  "(Cloud TPU pods, SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (CPU/GPU clusters).")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.DEFINE_string("cpu_collectives", None, "'gloo' for multi-process runs on CPU.")
flags.DEFINE_integer("heartbeat_timeout_s", None, "Multi-process: a process silent this many "
                     "seconds counts as dead and the others exit with an error (jax: 100).")
flags.DEFINE_integer("shutdown_timeout_s", None, "Multi-process: seconds a finishing process "
                     "waits at exit for the others (jax: 300).")
flags.mark_flags_as_required(["config", "workdir"])


def _out_of_space(error: BaseException | None) -> bool:
  """Whether ``error`` or one it was raised from is ENOSPC (orbax and clu wrap it)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or \
        "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def main(argv):
  """Runs the training; a ``UserError`` (bad config, missing or corrupt data, a checkpoint that
  does not fit the config, NaN, full disk) prints its message alone, as the last line, and
  exits with status 2 (``errors.exit_process``). Any other exception is a bug and keeps its
  traceback."""
  del argv
  try:
    _train()
  except errors.UserError as error:
    errors.exit_process(error)  # the message is the last line (see there)


def _train():
  from contrastive_jax import checkpoint
  checkpoint.quiet_orbax_logs()
  config_path = config_flags.get_config_filename(FLAGS["config"]).split(":", 1)[0]
  if not os.path.isfile(config_path):
    raise errors.ConfigError(
        f"--config: file {config_path!r} does not exist; use configs/<name>.py[:arg] with a "
        f"name in {configs.names()}, or the path of your own config file")
  # TensorFlow only feeds data: keep it off the accelerators that jax uses.
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  try:
    tf.config.set_visible_devices([], "TPU")
  except (ValueError, RuntimeError):
    pass

  import jax
  jax.config.update("jax_threefry_partitionable", True)
  from contrastive_jax import distributed, train

  if FLAGS.multihost or FLAGS.coordinator_address:
    timeouts = dict(heartbeat_timeout_s=FLAGS.heartbeat_timeout_s,
                    shutdown_timeout_s=FLAGS.shutdown_timeout_s)
    if FLAGS.multihost:
      distributed.initialize_distributed(cpu_collectives=FLAGS.cpu_collectives, **timeouts)
    else:
      distributed.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                         FLAGS.process_id, FLAGS.cpu_collectives, **timeouts)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except errors.UserError:
    raise
  except Exception as error:  # noqa: BLE001 -- re-raised, with a clear message on a full disk
    if _out_of_space(error):
      raise errors.OutOfSpaceError(
          errno.ENOSPC, f"--workdir={FLAGS.workdir} is out of disk space (No space left on "
          "device). Complete checkpoints already written are kept (an interrupted one is never "
          "listed); free space or move the run, then rerun the same command to resume") from error
    raise
  if not result.finished:  # preemption / stop_at_step: no summary.json yet
    print(f"stopped at step {result.stopped_at_step} with a checkpoint; rerun the same "
          "command to resume")
    return
  if jax.process_index() == 0:
    knn_k = int(result.summary.get("eval", {}).get("knn/k", 0))  # the k the kNN evaluator used
    print(train.format_summary(result.summary, knn_k=knn_k))
    print(f"full summary: {os.path.join(FLAGS.workdir, 'summary.json')}; TensorBoard: "
          f"tensorboard --logdir={FLAGS.workdir}")


if __name__ == "__main__":
  sys.argv = configs.resolve_argv(sys.argv)
  app.run(main)
