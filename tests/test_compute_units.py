"""What a worker's share gives it, as reported: cores on the CPU, SMs (or why not) on CUDA, carried
through the WorkerReport and GetStats, and shown by `duoctl status` in one "SMs/cores" column."""
from __future__ import annotations

import os

from duoserve.duoctl import format_status, format_units
from duoserve.v1 import admin_pb2
from services.common.contracts import WorkerReport, from_json, to_json
from services.worker.compute_units import ComputeUnits, probe_compute_units
from services.worker.servicer import units_to_pb


def test_on_the_cpu_a_worker_reports_its_cores_of_the_stack():
    assert probe_compute_units("cpu", (0,), (0, 1)) == ComputeUnits("core", 1, 2)
    mine = tuple(os.sched_getaffinity(0))
    assert probe_compute_units("cpu", (), mine) == ComputeUnits("core", len(mine), len(mine))


def test_on_cuda_without_the_probe_a_worker_reports_why(tmp_path):
    units = probe_compute_units("cuda:0", (), (0, 1), library=tmp_path / "missing.so")
    assert (units.kind, units.used) == ("sm", 0)
    assert "make native" in units.error
    # Without a driver nothing is known; with one, cuda-python still gives the device's SM count.
    assert units.total == 0 and "driver" in units.error or units.total >= 2


def test_units_travel_in_the_report_and_old_reports_still_read():
    report = WorkerReport("decode", "decode-1", "127.0.0.1:1", 0.5, (1,), 0, 0, 0, 0, 8, 8, 1.0,
                          units_kind="sm", units_used=33, units_total=132)
    assert from_json(WorkerReport, to_json(report)) == report
    old = to_json(report).replace(',"units_kind":"sm","units_used":33,"units_total":132', "")
    assert "units" not in old and from_json(WorkerReport, old).units_used == 0


def test_get_stats_carries_the_units_and_the_reason_when_unknown():
    pb = units_to_pb(ComputeUnits("sm", 0, 0, "no CUDA driver"))
    assert (pb.kind, pb.used, pb.total, pb.error) == ("sm", 0, 0, "no CUDA driver")
    assert units_to_pb(None).kind == ""                        # not probed yet


def _status(*workers: admin_pb2.WorkerStatus) -> admin_pb2.StackStatus:
    return admin_pb2.StackStatus(workers=list(workers))


def test_duoctl_status_shows_one_sms_cores_column():
    cpu = admin_pb2.WorkerStatus(phase="prefill", share=0.5, cpu_ids=[0], measured_units=1, units_total=2,
                                 units_kind="core")
    gpu = admin_pb2.WorkerStatus(phase="decode", share=0.25, measured_units=33, units_total=132, units_kind="sm")
    unknown = admin_pb2.WorkerStatus(phase="decode", share=0.25, units_kind="sm")
    assert [format_units(w) for w in (cpu, gpu, unknown)] == ["1/2", "33/132", "?"]
    lines = format_status(_status(cpu, gpu)).splitlines()
    header = next(line for line in lines if line.startswith("worker"))
    assert "SMs/cores" in header
    column = header.index("SMs/cores") + len("SMs/cores")          # right-aligned under its header
    rows = [line for line in lines if line.startswith(("prefill", "decode"))]
    assert [row[:column].split()[-1] for row in rows] == ["1/2", "33/132"]


def test_duoctl_status_says_what_each_share_buys_and_on_which_device():
    shares = admin_pb2.Shares(prefill=1.0, decode=0.3, token_budget=2048, prefill_units=132, decode_units=38)
    status = admin_pb2.StackStatus(policy=admin_pb2.PolicyState(mode="auto", shares=shares),
                                   model_fit=admin_pb2.ModelFit(backend="gpu", unit="sm", num_units=132))
    text = format_status(status)
    assert "prefill 1.00 (132 SMs), decode 0.30 (38 SMs), token budget 2048" in text
    assert "model (gpu, 132 SMs):" in text
    cpu = admin_pb2.StackStatus(policy=admin_pb2.PolicyState(mode="auto", shares=admin_pb2.Shares(
        prefill=0.5, decode=0.5, prefill_units=1, decode_units=1)), model_fit=admin_pb2.ModelFit(
        backend="cpu", unit="core", num_units=2))
    assert "prefill 0.50 (1 core)" in format_status(cpu) and "model (cpu, 2 cores):" in format_status(cpu)
    assert "model (cpu):" in format_status(admin_pb2.StackStatus(model_fit=admin_pb2.ModelFit(backend="cpu")))
