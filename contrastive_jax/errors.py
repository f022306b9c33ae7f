"""Errors a user can fix without reading our code: the entry points (``contrastive_jax.main``,
``python -m contrastive_jax.evaluate``) print their message alone and exit with status 2.

Every other exception is a bug (ours or a library's) and keeps its traceback. Each class also
derives from the built-in type it replaced, so ``except ValueError`` callers keep working.
Layer 0: imports nothing from the package.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

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


def require(ok: bool, message: str) -> None:
  """Raises ``ConfigError(message)`` unless ``ok``: one line of a module's ``check_config``."""
  if not ok:
    raise ConfigError(message)


def require_one_of(key: str, value: object, options) -> None:
  """Raises a ``ConfigError`` naming ``config.<key>`` and the options when ``value`` is none of
  them."""
  require(value in options, f"config.{key}={value!r} is unknown; use one of {list(options)}")


def exit_process(error: UserError) -> NoReturn:
  """Ends a command-line process on a user error: ``error: <message>`` is its last line, and
  the exit status is ``EXIT_CODE``. Only for process entry points (it never returns).

  The process exits right after the message, without the interpreter's shutdown: a failed
  checkpoint write (a full disk) or read leaves TensorStore I/O in flight, whose completions
  are delivered to orbax's asyncio event loop, already closed, and print a traceback each
  ("Event loop is closed"), for as long as the interpreter lives. Logs and streams are flushed
  first, a multi-process run leaves jax's coordination service in order
  (``jax.distributed.shutdown``, as at a normal exit, so the other processes are not left to
  notice a vanished peer), and the message is written last on a copy of stderr while
  stdout/stderr point at ``/dev/null``, so that no other thread can print after it. Nothing
  is lost: an uncommitted checkpoint is never listed, committed ones stay.
  """
  for handler in logging.getLogger().handlers:
    try:
      handler.flush()
    except Exception:  # noqa: BLE001 -- a closed stream: nothing left to flush
      pass
  jax = sys.modules.get("jax")
  if jax is not None:
    try:
      if jax.distributed.is_initialized():
        jax.distributed.shutdown()
    except Exception:  # noqa: BLE001 -- a peer already gone: exit anyway
      pass
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # noqa: BLE001
      pass
  stderr = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  os.write(stderr, f"error: {error}\n".encode())
  os._exit(EXIT_CODE)  # pylint: disable=protected-access
