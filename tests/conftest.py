"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the whole session, inherited by the subprocesses the
# tests start (trainer restarts, multi-process runs): the same small programs are compiled
# once instead of once per run. Only compile time changes; the executables are the same.
# The session that creates the folder removes it at exit (subprocesses inherit the variable,
# so they never create or remove one).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache_dir = tempfile.mkdtemp(prefix="contrastive_jax_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# torch's optional triton (GPU kernels, useless on CPU) segfaults on import once TensorFlow is
# loaded (both bundle LLVM); the parity tests import torch after other tests load TF.
sys.modules.setdefault("triton", None)

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


def pytest_configure(config):
  assert jax.device_count() == 8, (
      "tests expect 8 simulated CPU devices; jax was imported before conftest set XLA_FLAGS"
  )
