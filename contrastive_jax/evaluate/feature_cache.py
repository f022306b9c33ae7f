"""Frozen features of an evaluation split cached on disk, one file per host (layer 3).

The linear-probe protocol of SimCLR (Chen et al. 2020, Appendix B.6) and MoCo (He et al. 2020,
Sec. 4.1) trains a classifier on features of a frozen encoder: the features are a function of
the checkpoint alone, so a re-run at the same step (another regulariser grid, a crashed probe,
a second evaluator on the same split) need not encode ImageNet's 1.28M training images again.

Each host writes the rows it encoded itself (its contiguous shard of the split, before the
gather) to ``workdir/eval/features/step_<step>/<key>.process_<p>_of_<P>.npz`` through
``etils.epath`` (local or ``gs://``): ``feat [n_p, F]``, ``label [n_p]``, ``index [n_p]`` and a
JSON header (``__meta__``) holding the key it was computed for, the row count and a SHA-256 of
the arrays. ``key`` names everything the features depend on besides the weights (data config,
split, batch size, method, model); the step names the weights.

A file is used only when it reads completely, its header's key is this evaluation's and the
digest of what it holds matches the header's: a truncated, corrupt or foreign file is logged
and recomputed (``load`` returns None), never silently used. Files are written to a temporary
name and renamed, so a writer killed mid-file leaves no file under the final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
from absl import logging
from etils import epath

FORMAT = "contrastive_jax.feature_cache.v1"
_META = "__meta__"


def digest(arrays: dict[str, np.ndarray]) -> str:
  """SHA-256 over the arrays' names, dtypes, shapes and bytes (sorted by name)."""
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = np.ascontiguousarray(arrays[name])
    h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def cache_path(workdir, step: int, key: str, process_index: int,
               process_count: int) -> epath.Path:
  """``workdir/eval/features/step_<step>/<sha256(key)[:16]>.process_<p>_of_<P>.npz``."""
  name = hashlib.sha256(key.encode()).hexdigest()[:16]
  return (epath.Path(workdir) / "eval" / "features" / f"step_{int(step)}" /
          f"{name}.process_{process_index}_of_{process_count}.npz")


def save(path: epath.Path, arrays: dict[str, np.ndarray], key: str) -> None:
  """Writes ``arrays`` (equal leading dimension) with their header; atomic rename."""
  rows = {len(v) for v in arrays.values()}
  if len(rows) != 1:
    raise ValueError(f"cached arrays must have one row count, got {rows}")
  meta = {"format": FORMAT, "key": key, "rows": rows.pop(), "digest": digest(arrays)}
  buf = io.BytesIO()
  np.savez(buf, **arrays, **{_META: np.frombuffer(json.dumps(meta).encode(), np.uint8)})
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(buf.getvalue())
  tmp.replace(path)


def load(path: epath.Path, key: str) -> dict[str, np.ndarray] | None:
  """The cached arrays, or None when the file is absent or cannot be trusted (logged)."""
  if not path.exists():
    return None
  try:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop(_META).tobytes().decode())
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError) as e:
    logging.warning("feature cache %s is unreadable (%s: %s): recomputing", path,
                    type(e).__name__, e)
    return None
  problem = None
  if meta.get("format") != FORMAT or meta.get("key") != key:
    problem = "was written for another evaluation"
  elif any(len(v) != meta.get("rows") for v in arrays.values()):
    problem = "has a row count other than its header's"
  elif digest(arrays) != meta.get("digest"):
    problem = "does not match its checksum"
  if problem:
    logging.warning("feature cache %s %s: recomputing", path, problem)
    return None
  return arrays
