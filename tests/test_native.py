"""The native SM probe (native/sm_probe.cu): it builds with nvcc, loads with ctypes anywhere, says
clearly why it cannot count without a GPU, and on a GPU counts the SMs a launch runs on (fewer
under an MPS active thread percentage)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.sm_probe import (ABI_VERSION, DEFAULT_LIBRARY, ProbeCode, SmProbeResult, load_library,
                                      probe_sms)

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def native_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The library built from the checked-in source into a private folder, as `make native` builds it."""
    if NVCC is None:
        pytest.skip("nvcc not found: `make native` skips the SM probe on this machine")
    build = tmp_path_factory.mktemp("native-build")
    result = subprocess.run(["make", "-C", str(ROOT / "native"), f"BUILD={build}", f"NVCC={NVCC}"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return build / "libduoserve_native.so"


def _probe_in_child(library: Path, env: dict[str, str] | None = None) -> SmProbeResult:
    """The probe in a fresh process (its own CUDA context, with the given environment)."""
    code = ("import dataclasses, json, sys; from pathlib import Path; from services.common.sm_probe import probe_sms; "
            "print(json.dumps(dataclasses.asdict(probe_sms(0, library=Path(sys.argv[1])))))")
    out = subprocess.run([sys.executable, "-c", code, str(library)], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**os.environ, **(env or {})}, check=True).stdout
    data = json.loads(out.splitlines()[-1])
    return SmProbeResult(data["num_sms_used"], data["num_sms_total"], data["error"], ProbeCode(data["code"]))


def test_the_library_builds_and_exports_its_version(native_library):
    lib = load_library(native_library)
    assert lib.duo_sm_probe_version() == ABI_VERSION
    assert lib.duo_sm_probe_cuda_runtime_version() >= 13000       # built with the CUDA 13 toolkit
    assert lib.duo_sm_probe_driver_version() >= 0                  # 0: no driver here


def test_make_native_builds_into_native_build():
    if NVCC is None:
        pytest.skip("nvcc not found")
    result = subprocess.run(["make", "native"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert load_library(DEFAULT_LIBRARY).duo_sm_probe_version() == ABI_VERSION


def test_without_a_gpu_the_probe_names_the_cause(native_library):
    if _has_gpu():
        pytest.skip("this machine has a GPU")
    result = probe_sms(0, library=native_library)
    assert not result.ok and (result.num_sms_used, result.num_sms_total) == (0, 0)
    assert result.code in (ProbeCode.NO_DRIVER, ProbeCode.NO_DEVICE, ProbeCode.OLD_DRIVER), result
    assert ("driver" in result.error) or ("device" in result.error), result.error
    assert probe_sms(0, library=native_library) == result                    # no sticky state, no crash


def test_a_missing_library_is_a_result_not_an_exception(tmp_path):
    result = probe_sms(0, library=tmp_path / "libduoserve_native.so")
    assert result.code is ProbeCode.NO_LIBRARY and "make native" in result.error


def test_a_library_of_another_abi_is_refused(tmp_path):
    not_ours = tmp_path / "libnotours.so"
    not_ours.write_bytes(b"\x7fELF not really")
    result = probe_sms(0, library=not_ours)
    assert result.code is ProbeCode.NO_LIBRARY and "cannot load" in result.error


@pytest.mark.gpu
def test_at_full_share_the_probe_runs_on_every_sm(native_library):
    if "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" in os.environ:
        pytest.skip("this process runs under an MPS limit")
    result = _probe_in_child(native_library)
    assert result.ok, result.error
    assert result.num_sms_total > 0 and result.num_sms_used == result.num_sms_total, result


def _mps_daemon_reachable() -> bool:
    """An MPS control daemon listens in the pipe directory its clients use (NVIDIA's MPS documentation)."""
    pipe_dir = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    return (pipe_dir / "control").exists()


@pytest.mark.gpu
def test_under_an_mps_limit_the_probe_sees_fewer_sms(native_library):
    if not _mps_daemon_reachable():
        pytest.skip("no MPS control daemon reachable (start one with nvidia-cuda-mps-control -d)")
    full = _probe_in_child(native_library)
    limited = _probe_in_child(native_library, {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"})
    assert full.ok and limited.ok, (full.error, limited.error)
    # Compared with the unlimited count: whether MPS also lowers the reported total is not relied on.
    assert 0 < limited.num_sms_used < full.num_sms_used, (full, limited)
    assert limited.num_sms_used <= full.num_sms_used // 2, (full, limited)     # 25%, allowing for rounding


def test_importing_the_loader_does_no_work():
    code = ("import sys; from services.common.sm_probe import load_library; "
            "print(load_library.cache_info().currsize, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["0", "False"]
