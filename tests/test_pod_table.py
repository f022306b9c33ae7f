"""benchmarks/pod_table.py assembles its table from saved reports: a row can be compiled on
one day, by ``pod_table.py`` or ``compile_for --json``, and the table printed on another."""

import dataclasses
import importlib.util
import json
import os

from contrastive_jax import compile_for, hardware, hlo_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pod_table():
  spec = importlib.util.spec_from_file_location(
      "pod_table", os.path.join(ROOT, "benchmarks", "pod_table.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _report(config, target, chip, program, made=True):
  rep = dict(config=f"configs/{config}.py", target=target, chips=64, hosts=16,
             chip=dataclasses.asdict(chip), headroom=0.1, usable_hbm_bytes=0.9 * chip.hbm_bytes,
             num_params=151e6, global_batch=32768, programs=[dataclasses.asdict(program)],
             fits=program.total_bytes < 0.9 * chip.hbm_bytes,
             input=dict(examples_per_host_step=2048, examples_per_host_second=4096.0,
                        per_core_rate=250.0, per_core_rate_measured=True, cores_needed=16.4,
                        host_vcpus=chip.host_vcpus, kind="image-text pairs"),
             strategy="replicated", remat=True)
  if made:
    rep["made"] = dict(date="2026-12-04 18:40 UTC", jax="0.10.2", compiler="libtpu 0.0.42.1")
  return rep


def test_assembles_saved_reports_in_config_order(tmp_path):
  pod_table = _pod_table()
  v5e = hardware.chip_spec("v5e")
  coll = {k: {"count": 1.0, "bytes": 2e6} for k in hlo_stats.COLLECTIVE_KINDS}
  fits = compile_for.ProgramReport(
      name="train step", state_bytes=2 ** 30, argument_bytes=2 ** 30, output_bytes=2 ** 30,
      alias_bytes=2 ** 30, temp_bytes=3 * 2 ** 30, code_bytes=0, total_bytes=4 * 2 ** 30,
      flops=2.5e12, cost_model_flops=2e12, bytes_accessed=1e10, loops=[], collectives=coll,
      compile_seconds=600.0)
  fits.bound = compile_for.roofline(fits, v5e)
  oom = compile_for._oom_report("train step", (20.5 * 2 ** 30, 15.75 * 2 ** 30), 2 ** 30,  # pylint: disable=protected-access
                                900.0)
  reports = {"clip_vit_b32.v5e-256": _report("clip_vit_b32", "v5e-256 (v5e:16x16)", v5e, fits),
             "simclr_resnet50_imagenet.v5e-64": _report(
                 "simclr_resnet50_imagenet", "v5e-64 (v5e:8x8)", v5e, oom, made=False)}
  reports["mocov3_vit_base_imagenet.v5e-64"] = dict(
      config="configs/mocov3_vit_base_imagenet.py", target="v5e-64",
      error="JaxRuntimeError: INTERNAL: RET_CHECK failure", made=reports[
          "clip_vit_b32.v5e-256"]["made"])
  for name, rep in reports.items():
    (tmp_path / f"{name}.json").write_text(json.dumps(rep))
  lines = pod_table.assemble(str(tmp_path)).splitlines()
  rows = [x for x in lines if x.startswith("| ") and not x.startswith("| config")]
  assert [r.split(" | ")[0] for r in rows] == [
      "| simclr_resnet50_imagenet", "| mocov3_vit_base_imagenet", "| clip_vit_b32"]
  assert "| v5e-64 | error: JaxRuntimeError: INTERNAL: RET_CHECK failure |" in rows[1]
  rows.pop(1)
  assert "**no** (out of HBM at compile)" in rows[0] and "> 20.50" in rows[0]
  cells = rows[1].split(" | ")
  assert cells[1:4] == ["v5e-256 (v5e:16x16)", "512", "151M"]
  assert cells[6:10] == ["4.00", "0.00", "16", "yes"] and cells[10] == "2.50"
  assert cells[11] == "2 / 2 / 2 / 2 / 2" and cells[-2] == "17 / 112"
  assert "made: 2026-12-04 18:40 UTC 0.10.2 libtpu 0.0.42.1; before provenance" in lines[-1]
  assert all(len(lines[0].split("|")) == len(x.split("|")) for x in lines[2:5])
