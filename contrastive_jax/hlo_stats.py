"""What a compiled program computes and moves, read from its optimised HLO text.

``jax.jit(f).lower(...).compile()`` gives ``cost_analysis()["flops"]`` from XLA's cost model,
but that model visits a ``while`` body once: a step whose loss runs GradCache micro-batches or
a ring of ``ppermute`` steps in a loop reports the FLOPs of one iteration. ``loop_flops`` reads
the loops' trip counts from the HLO (the ``known_trip_count`` the compiler records, or the
canonical counter of ``fori_loop``/``scan``: ``i = init; while i < N: i += 1``) and counts the
matrix products (``dot`` and ``convolution``, the FLOPs that matter on a matrix unit) once per
iteration; ``flops_with_loops`` adds what the cost model left out. Matmuls match the unrolled
program (tests/test_compile_for.py); a convolution's count here includes padded window
positions (ResNet-50's step: 16% above the cost model), so a looped convolution is counted
high by up to that much. XLA:GPU has no cost model and compiles its matrix products to
cuBLAS GEMM and cuDNN convolution ``custom-call``s: ``loop_flops`` counts those too (from the
GEMM's dimension numbers in ``backend_config`` and the convolution's ``dim_labels``), so on a
GPU it is the program's matrix-product FLOPs (tests/test_gpu_targets.py). ``collective_bytes``
sums the bytes each device sends for every collective kind, loops counted by their trip counts.

Bytes per device of one collective over a group of ``g`` devices, with the bandwidth-optimal
(ring) algorithms: all-gather ``(g-1)/g`` of its output, reduce-scatter ``g-1`` times its
output, all-reduce ``2 (g-1)/g`` of its operand, all-to-all ``(g-1)/g`` of its operand, and a
collective-permute its whole operand (Chan et al. 2007, "Collective communication: theory,
practice, and experience"; the same counts as the NCCL performance notes' "bus bandwidth").

The HLO text grammar is XLA's (https://openxla.org/xla/operation_semantics); only the parts
read here are parsed: instruction names, result types, opcodes, operands and the attributes
``calls``, ``body``, ``condition``, ``to_apply``, ``branch_computations``, ``replica_groups``,
``dim_labels``, ``lhs_dilate``, ``lhs_contracting_dims``, ``custom_call_target`` and
``backend_config``'s ``known_trip_count`` and ``lhs_contracting_dimensions``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute",
                    "all-to-all")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")


@dataclasses.dataclass
class Instruction:
  name: str
  type: str        # result type text, e.g. "f32[8,128]{1,0}" or a tuple "(s32[], ...)"
  opcode: str
  operands: list[str]
  attrs: str
  args: str = ""   # the raw text between the opcode's parentheses (a constant's value)


@dataclasses.dataclass
class Module:
  computations: dict[str, list[Instruction]]
  entry: str
  by_name: dict[str, Instruction]


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at ``text[start]``."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  stack = []
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  return len(text)


def _parse_instruction(line: str) -> Instruction | None:
  m = _INSTR.match(line)
  if not m:
    return None
  name, rest = m.group(1), m.group(2)
  if rest.startswith("("):
    end = _balanced(rest, 0)
  else:
    end = rest.find(" ")  # a layout such as {1,0:T(8,128)} follows the shape without a space
  type_text, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([a-z][a-z0-9\-_.]*)\(", rest)
  if not op:
    return None
  start = op.end() - 1
  close = _balanced(rest, start)
  operands = re.findall(r"%([^\s,()]+)", rest[start:close])
  return Instruction(name, type_text, op.group(1), operands, rest[close:],
                     rest[start + 1:close - 1])


def parse(hlo_text: str) -> Module:
  """The computations of an HLO module's text (``compiled.as_text()``)."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = m.group(2)
        computations[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    instr = _parse_instruction(line)
    if instr is not None:
      computations[current].append(instr)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text; pass compiled.as_text()")
  by_name = {i.name: i for instrs in computations.values() for i in instrs}
  return Module(computations, entry, by_name)


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """``[(dtype, dims), ...]`` of a result type (one entry, or several for a tuple)."""
  return [(dt, tuple(int(d) for d in dims.split(",") if d))
          for dt, dims in _ARRAY.findall(type_text) if dt in _DTYPE_BYTES]


def nbytes(shapes) -> float:
  return sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in shapes)


def _callees(instr: Instruction) -> Iterator[tuple[str, str]]:
  """``(role, computation)`` pairs: role "body", "condition" or "call"."""
  for role, pattern in (("body", r"\bbody=%?([^\s,}]+)"),
                        ("condition", r"\bcondition=%?([^\s,}]+)"),
                        ("call", r"\b(?:calls|to_apply)=%?([^\s,}]+)")):
    for name in re.findall(pattern, instr.attrs):
      yield role, name
  for group in re.findall(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}",
                          instr.attrs):
    for name in re.findall(r"%?([^\s,{}]+)", group):
      yield "call", name


def _constant(module: Module, name: str) -> int | None:
  """The integer value of ``name`` when it is a scalar constant (through copies/converts)."""
  seen = 0
  while name in module.by_name and seen < 8:
    instr = module.by_name[name]
    if instr.opcode == "constant":
      value = re.fullmatch(r"\s*(-?\d+)\s*", instr.args)
      return int(value.group(1)) if value else None
    if instr.opcode in ("copy", "convert", "bitcast", "reshape") and instr.operands:
      name = instr.operands[0]
      seen += 1
      continue
    return None
  return None


def trip_count(module: Module, while_instr: Instruction) -> int | None:
  """The iterations of a ``while``: its ``known_trip_count`` or, for the canonical counter
  loop (condition ``compare(get-tuple-element(p, k), N)``, body ``k <- k + 1``, init a
  constant), ``N - init`` (``+1`` for ``LE``). ``None`` when neither applies."""
  known = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', while_instr.attrs)
  if known:
    return int(known.group(1))
  roles = dict(_callees(while_instr))
  cond = module.computations.get(roles.get("condition", ""), [])
  body = module.computations.get(roles.get("body", ""), [])
  if not cond or not body or not while_instr.operands:
    return None
  root = cond[-1]
  local = {i.name: i for i in cond}
  if root.opcode != "compare" or len(root.operands) != 2:
    return None
  direction = re.search(r"direction=([A-Z]+)", root.attrs)
  direction = direction.group(1) if direction else ""
  a, b = (local.get(n) for n in root.operands)
  if a is None or b is None:
    return None
  if a.opcode != "get-tuple-element":  # N > i is i < N
    a, b = b, a
    direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
  if a.opcode != "get-tuple-element" or direction not in ("LT", "LE"):
    return None
  index = re.search(r"index=(\d+)", a.attrs)
  limit = _constant(module, b.name)
  if index is None or limit is None:
    return None
  k = int(index.group(1))
  # The body must step element k by +1.
  body_local = {i.name: i for i in body}
  body_root = body[-1]
  if body_root.opcode != "tuple" or k >= len(body_root.operands):
    return None
  step = body_local.get(body_root.operands[k])
  if step is None or step.opcode != "add":
    return None
  increments = [_constant(module, n) for n in step.operands]
  if 1 not in increments:
    return None
  init_tuple = module.by_name.get(while_instr.operands[0])
  if init_tuple is None or init_tuple.opcode != "tuple" or k >= len(init_tuple.operands):
    return None
  init = _constant(module, init_tuple.operands[k])
  if init is None:
    return None
  return max(0, limit - init + (1 if direction == "LE" else 0))


# XLA:GPU's library calls for matrix products (``custom-call`` targets): cuBLAS GEMMs carry
# the dot's dimension numbers in ``backend_config``; cuDNN convolutions carry the forward
# convolution's ``dim_labels`` (input_kernel->output) whatever their direction.
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul", "__cublas$lt$matmul$f8")
_CONV_TARGETS = ("__cudnn$convForward", "__cudnn$convBiasActivationForward",
                 "__cudnn$convBackwardInput", "__cudnn$convBackwardFilter")


def _target(instr: Instruction) -> str:
  m = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
  return m.group(1) if m else ""


def _type_of(module: Module, name: str) -> tuple[int, ...] | None:
  instr = module.by_name.get(name)
  shapes = arrays(instr.type) if instr is not None else []
  return shapes[0][1] if shapes else None


def _conv_flops(labels: str, out_dims, kernel_dims) -> float:
  """2 x (forward output elements) x (kernel elements per output feature): each output
  element sums over the kernel's spatial and (per group) input-feature dims."""
  if out_dims is None or kernel_dims is None:
    return 0.0
  per_out = math.prod(d for d, label in zip(kernel_dims, labels) if label != "o")
  return 2.0 * math.prod(out_dims) * per_out


def _dot_flops(module: Module, instr: Instruction) -> float:
  """FLOPs of one matrix product: a ``dot``, a ``convolution``, or XLA:GPU's cuBLAS GEMM or
  cuDNN convolution ``custom-call`` (0 for any other instruction)."""
  out = arrays(instr.type)
  if not out:
    return 0.0
  out_dims = out[0][1]  # a library call's result is (output, workspace)
  target = _target(instr) if instr.opcode == "custom-call" else ""
  if instr.opcode == "dot" or target in _GEMM_TARGETS:
    lhs = _type_of(module, instr.operands[0]) if instr.operands else None
    if instr.opcode == "dot":
      dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
      contracting = dims.group(1).split(",") if dims else None
    else:
      dims = re.search(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]', instr.attrs)
      contracting = re.findall(r"\d+", dims.group(1)) if dims else None
    if lhs is None or contracting is None:
      return 0.0
    k = math.prod(lhs[int(d)] for d in contracting if d)
    return 2.0 * math.prod(out_dims) * k
  if instr.opcode != "convolution" and target not in _CONV_TARGETS:
    return 0.0
  labels = re.search(r"dim_labels=[^_]+_([^-]+)->", instr.attrs)
  if len(instr.operands) < 2 or not labels:
    return 0.0
  first, second = (_type_of(module, n) for n in instr.operands[:2])
  if target == "__cudnn$convBackwardInput":     # (output gradient, kernel) -> input gradient
    flops = _conv_flops(labels.group(1), first, second)
  elif target == "__cudnn$convBackwardFilter":  # (input, output gradient) -> kernel gradient
    flops = _conv_flops(labels.group(1), second, out_dims)
  else:                                         # (input, kernel) -> output
    flops = _conv_flops(labels.group(1), out_dims, second)
  # With lhs_dilate=d only 1/d of a window's taps meet input values (the rest are inserted
  # zeros): XLA:TPU writes a batched matmul (attention's bqhd,bkhd->bhqk) as such a convolution,
  # its window walking batch and heads with one real tap each.
  dilate = re.search(r"lhs_dilate=([0-9x]+)", instr.attrs)
  if dilate:
    flops /= math.prod(int(v) for v in dilate.group(1).split("x"))
  return flops


@dataclasses.dataclass
class LoopInfo:
  name: str
  trip_count: int | None   # None: unknown (counted once, as the cost model does)


def _walk(module: Module, use_trips: bool):
  """``(computation, multiplier)`` for every computation reachable from ENTRY, and the loops.
  With ``use_trips`` a while body counts its trip count times, else once."""
  multipliers: dict[str, float] = {}
  loops: list[LoopInfo] = []

  def visit(comp: str, mult: float, depth: int = 0):
    if comp not in module.computations or depth > 64:
      return
    multipliers[comp] = multipliers.get(comp, 0.0) + mult
    for instr in module.computations[comp]:
      for role, callee in _callees(instr):
        if role == "condition":
          continue
        factor = 1
        if role == "body":
          trips = trip_count(module, instr)
          if use_trips:
            loops.append(LoopInfo(instr.name, trips))
            factor = trips if trips is not None else 1
        visit(callee, mult * factor, depth + 1)

  visit(module.entry, 1.0)
  return multipliers, loops


def loop_flops(module: Module, use_trips: bool = True) -> float:
  """FLOPs of the matrix products (``dot``, ``convolution``, XLA:GPU's cuBLAS and cuDNN
  calls), each computation counted as often as it runs
  (``use_trips``) or once per call site (as XLA's cost model counts loops)."""
  multipliers, _ = _walk(module, use_trips)
  total = 0.0
  for comp, mult in multipliers.items():
    for instr in module.computations[comp]:
      if instr.opcode in ("dot", "convolution", "custom-call"):
        total += mult * _dot_flops(module, instr)
  return total


def loops(module: Module) -> list[LoopInfo]:
  """Every ``while`` reachable from ENTRY with its trip count (``None``: unknown)."""
  return _walk(module, True)[1]


def flops_with_loops(cost_flops: float, module: Module) -> float:
  """``cost_analysis()["flops"]`` plus the matrix-product FLOPs of the loop iterations beyond
  the first, which the cost model does not count."""
  return float(cost_flops) + loop_flops(module, True) - loop_flops(module, False)


def _group_size(attrs: str, num_devices: int) -> int:
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if iota:
    return int(iota.group(2))
  # Named mesh axes (XLA:GPU's text): replica_groups=mesh['x'=8,'y'=2] {'x'} groups the
  # devices along the listed axes.
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if mesh:
    sizes = {a: int(n) for a, n in re.findall(r"'([^']+)'\s*=\s*(\d+)", mesh.group(1))}
    return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", mesh.group(2)))
  groups = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
  if groups:
    return len([x for x in groups.group(1).split(",") if x.strip()])
  return num_devices


def _moved_bytes(kind: str, instr: Instruction, num_devices: int) -> float:
  shapes = arrays(instr.type)
  if instr.opcode.endswith("-start"):
    if kind == "all-gather":
      shapes = shapes[len(shapes) // 2:]          # (operands..., outputs...)
    elif kind == "collective-permute":
      data = [s for s in shapes if s[1]]          # drop the u32[] context scalars
      shapes = data[len(data) // 2:]
  size = nbytes(shapes)
  g = _group_size(instr.attrs, num_devices)
  if g <= 1 and kind != "collective-permute":
    return 0.0
  return {"all-gather": size * (g - 1) / g, "reduce-scatter": size * (g - 1),
          "all-reduce": 2 * size * (g - 1) / g, "all-to-all": size * (g - 1) / g,
          "collective-permute": size}[kind]


def collective_bytes(module: Module, num_devices: int) -> dict[str, dict[str, float]]:
  """``{kind: {"count": ops executed, "bytes": bytes sent per device}}`` for the five kinds,
  loop bodies counted by their trip counts (unknown: once)."""
  multipliers, _ = _walk(module, True)
  out = {k: {"count": 0.0, "bytes": 0.0} for k in COLLECTIVE_KINDS}
  for comp, mult in multipliers.items():
    for instr in module.computations[comp]:
      op = instr.opcode
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind not in out:
        continue
      out[kind]["count"] += mult
      out[kind]["bytes"] += mult * _moved_bytes(kind, instr, num_devices)
  return out
