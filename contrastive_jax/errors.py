"""Errors a user can fix without reading our code: the entry points (``contrastive_jax.main``,
``python -m contrastive_jax.evaluate``) print their message alone and exit with status 2.

Every other exception is a bug (ours or a library's) and keeps its traceback. Each class also
derives from the built-in type it replaced, so ``except ValueError`` callers keep working.
Layer 0: imports nothing from the package.
"""

from __future__ import annotations

EXIT_CODE = 2  # as argparse and absl flags use for a bad command line


class UserError(Exception):
  """A mistake in the command line, the config, the data or the run directory; the message
  names what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the key and the fix."""


class DataError(UserError, ValueError):
  """Data that cannot be read: a missing dataset, file or folder, or an empty split."""


class CheckpointMismatchError(UserError, RuntimeError):
  """No checkpoint of the run directory restores into the state this config builds (a changed
  model or optimizer on resume, or every step damaged)."""


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss (or another logged metric) became NaN or infinite."""


class OutOfSpaceError(UserError, OSError):
  """The run directory's disk is full."""


class RunDirectoryError(UserError, ValueError):
  """``--workdir`` is not a training run's directory, or has no checkpoint (at that step)."""
