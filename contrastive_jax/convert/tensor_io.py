"""Reading and writing tensor files without torch: safetensors, ``.npz`` and (torch only) pickles.

safetensors (https://huggingface.co/docs/safetensors, "Format"): an 8-byte little-endian header
length ``n``, ``n`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}``, then the raw little-endian bytes of every tensor. The format is
simple enough to read with numpy alone, so importing a checkpoint never needs torch or the
``safetensors`` package; bfloat16 comes from ``ml_dtypes`` (a jax dependency).

``.bin`` / ``.pt`` / ``.pth`` files are torch pickles; they are read only when torch happens to be
installed, and with ``torch.load(weights_only=True)``: a full unpickle of a file from the
internet can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np
from etils import epath

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """``(tensors, metadata)`` of a safetensors file, tensors as numpy arrays."""
  data = epath.Path(path).read_bytes()
  if len(data) < 8:
    raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
  (n,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8:8 + n])
  except ValueError as e:
    raise ValueError(f"{path}: not a safetensors file (header is not JSON)") from e
  meta = header.pop("__metadata__", None) or {}
  body = memoryview(data)[8 + n:]
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which this reader "
                       f"does not handle (known: {sorted(_DTYPES)})")
    begin, end = info["data_offsets"]
    arr = np.frombuffer(body[begin:end], dtype=np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<"))
    out[name] = arr.reshape(info["shape"]).astype(_DTYPES[info["dtype"]])
  return out, dict(meta)


def read_safetensors_header(path: str) -> tuple[dict[str, dict], dict[str, str], int]:
  """``(tensor infos, metadata, data offset)`` of a safetensors file, reading only its header.

  A tensor info is ``{"dtype", "shape", "data_offsets"}``; its bytes lie at ``data offset +
  data_offsets`` in the file. Reading the header costs its own size, whatever the file's.
  """
  with epath.Path(path).open("rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw)
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise ValueError(f"{path}: not a safetensors file (header is not JSON)") from e
  meta = header.pop("__metadata__", None) or {}
  for name, info in header.items():
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which this reader "
                       f"does not handle (known: {sorted(_DTYPES)})")
  return header, dict(meta), 8 + n


def tensor_dtype(info: Mapping) -> np.dtype:
  """The numpy dtype of a header entry of ``read_safetensors_header``."""
  return np.dtype(_DTYPES[info["dtype"]])


def read_safetensors_metadata(path: str) -> dict[str, str]:
  """The ``__metadata__`` of a safetensors file, reading only its header."""
  return read_safetensors_header(path)[1]


# A slice read loads whole rows of the outermost dimension in blocks of at most this many bytes
# and cuts them in memory; a row larger than this is split along the next dimension. The host
# buffer of a slice read is thus at most this big plus the slice itself, whatever the tensor's
# size, and a slice of contiguous rows costs one read per block (few requests on gs://).
READ_BLOCK_BYTES = 64 * 2**20


def _read_bytes(f, offset: int, size: int) -> bytes:
  """One positioned read (all reads of ``read_slice`` go through here: tests count them)."""
  f.seek(offset)
  data = f.read(size)
  if len(data) != size:
    raise ValueError(f"truncated safetensors file: wanted {size} bytes at {offset}, "
                     f"got {len(data)}")
  return data


def _fill(f, offset: int, shape: tuple[int, ...], dtype: np.dtype,
          bounds: tuple[tuple[int, int], ...], out: np.ndarray, block_bytes: int) -> None:
  """Reads ``array[bounds]`` of the C-ordered array of ``shape`` stored at ``offset``."""
  if not shape:
    out[...] = np.frombuffer(_read_bytes(f, offset, dtype.itemsize), dtype)[0]
    return
  row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
  start, stop = bounds[0]
  rows_per_block = block_bytes // row_bytes if row_bytes else stop - start
  if rows_per_block >= 1 or row_bytes == 0:
    inner = (slice(None),) + tuple(slice(a, b) for a, b in bounds[1:])
    for a in range(start, stop, max(rows_per_block, 1)):
      b = min(stop, a + max(rows_per_block, 1))
      rows = np.frombuffer(_read_bytes(f, offset + a * row_bytes, (b - a) * row_bytes), dtype)
      out[a - start:b - start] = rows.reshape((b - a,) + tuple(shape[1:]))[inner]
  else:
    for a in range(start, stop):
      _fill(f, offset + a * row_bytes, shape[1:], dtype, bounds[1:], out[a - start, ...],
            block_bytes)


def read_slice(path: str, name: str, index: tuple[slice, ...] = (), *,
               header: tuple[dict, dict, int] | None = None,
               block_bytes: int | None = None, file=None) -> np.ndarray:
  """``tensor[index]`` of the safetensors tensor ``name``, reading only the rows it needs.

  Args:
    path: a safetensors file (local or any ``etils.epath`` path, e.g. gs://).
    name: the tensor's name.
    index: one ``slice`` (step 1 or None) per leading dimension, as
      ``jax.make_array_from_callback`` passes a device's shard; missing dimensions are whole.
    header: ``read_safetensors_header(path)``, when the caller has it (one read per file).
    block_bytes: the largest single read (default ``READ_BLOCK_BYTES``).
    file: an open binary handle of ``path`` to read from (many slices, one open: on gs://
      every open is a request); default: opened and closed here.

  Returns:
    A new ``[...]`` array of the slice's shape and the file's dtype.
  """
  infos, _, data_start = header or read_safetensors_header(path)
  if name not in infos:
    raise ValueError(f"{path} has no tensor {name!r}")
  info = infos[name]
  shape = tuple(int(d) for d in info["shape"])
  dtype = tensor_dtype(info).newbyteorder("<")
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  bounds = []
  for i, (s, d) in enumerate(zip(index, shape)):
    start, stop, step = s.indices(d)
    if step != 1:
      raise ValueError(f"read_slice({name!r}): dimension {i} has step {step}; only 1")
    bounds.append((start, max(start, stop)))
  out = np.empty(tuple(b - a for a, b in bounds), dtype)
  if out.size:
    with contextlib.nullcontext(file) if file is not None else epath.Path(path).open("rb") as f:
      _fill(f, data_start + int(info["data_offsets"][0]), shape, dtype, tuple(bounds), out,
            int(block_bytes or READ_BLOCK_BYTES))
  return out.astype(tensor_dtype(info))


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes ``tensors`` (name -> array) and string ``metadata`` as a safetensors file."""
  header: dict = {}
  chunks, offset = [], 0
  for name in sorted(tensors):
    arr = np.asarray(tensors[name])  # (ascontiguousarray would make a scalar [1]); tobytes is C order
    if arr.dtype not in _NAMES:
      raise ValueError(f"tensor {name!r} has dtype {arr.dtype}; safetensors here takes "
                       f"{sorted(str(d) for d in _NAMES)}")
    raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the spec aligns the data on 8 bytes
  epath.Path(path).write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def write_safetensors_streaming(path: str,
                                entries: Sequence[tuple[str, Sequence[int], np.dtype]],
                                arrays: Iterable[tuple[str, np.ndarray]],
                                metadata: Mapping[str, str] | None = None) -> None:
  """Writes a safetensors file whose tensors arrive one by one: the header from ``entries``
  (``(name, shape, dtype)`` in file order, known before any data), then each array of
  ``arrays`` (``(name, array)`` in the same order) as it comes, so only one is in memory."""
  header: dict = {}
  offset = 0
  for name, shape, dtype in entries:
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
      raise ValueError(f"tensor {name!r} has dtype {dtype}; safetensors here takes "
                       f"{sorted(str(d) for d in _NAMES)}")
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": _NAMES[dtype], "shape": [int(d) for d in shape],
                    "data_offsets": [offset, offset + size]}
    offset += size
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  names = [e[0] for e in entries]
  with epath.Path(path).open("wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    count = 0
    for name, arr in arrays:
      if count >= len(names) or name != names[count]:
        raise ValueError(f"write_safetensors_streaming: got {name!r}, expected "
                         f"{names[count] if count < len(names) else 'no more tensors'}")
      info = header[name]
      arr = np.asarray(arr)
      if list(arr.shape) != info["shape"] or _NAMES.get(arr.dtype) != info["dtype"]:
        raise ValueError(f"tensor {name!r}: {arr.shape} {arr.dtype} does not match its header "
                         f"entry {info['shape']} {info['dtype']}")
      f.write(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
      count += 1
  if count != len(names):
    raise ValueError(f"write_safetensors_streaming: {len(names) - count} tensors never came")


def read_tensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """``(tensors, metadata)`` of a ``.safetensors``, ``.npz`` or (torch installed) ``.bin/.pt``.

  A torch file holding ``{"state_dict": ...}`` (open_clip's training checkpoints) is unwrapped,
  and a ``module.`` prefix from DistributedDataParallel is removed.
  """
  p = str(path)
  if not epath.Path(p).exists():
    raise ValueError(f"weight file {p!r} does not exist")
  if p.endswith(".safetensors"):
    return read_safetensors(p)
  if p.endswith(".npz"):
    with np.load(epath.Path(p).open("rb"), allow_pickle=False) as z:
      return {k: z[k] for k in z.files}, {}
  if p.endswith(TORCH_SUFFIXES):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{p} is a torch pickle; install torch to read it, or convert it to "
                        ".safetensors first (safetensors.torch.save_file)") from e
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
      obj = obj["state_dict"]
    if not isinstance(obj, dict):
      raise ValueError(f"{p} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
      k = k[len("module."):] if k.startswith("module.") else k
      if v.dtype == torch.bfloat16:
        out[k] = v.float().numpy().astype(ml_dtypes.bfloat16)
      else:
        out[k] = v.numpy()
    return out, {}
  raise ValueError(f"{p}: unknown weight file type; use .safetensors, .npz or "
                   f"{'/'.join(TORCH_SUFFIXES)} (the last with torch installed)")
