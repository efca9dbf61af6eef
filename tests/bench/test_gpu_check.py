"""bench.gpu_check: refuses quickly and clearly without a GPU; its table. The check itself needs a GPU
(`make gpu-check`; tests/e2e/test_cuda_stack.py covers the same stack under the gpu marker)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu_check import EXIT_NO_GPU, StackChecks, missing_gpu_reason, render

REPO = Path(__file__).resolve().parents[2]


def test_without_a_gpu_it_refuses_at_once_with_a_clear_message():
    if missing_gpu_reason() is None:
        pytest.skip("this machine has a GPU: the check would run")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == EXIT_NO_GPU
    assert "gpu-check needs an NVIDIA GPU" in done.stderr and "Nothing was started" in done.stderr
    assert done.stdout == ""
    assert time.monotonic() - started < 30


def test_the_table_has_the_checks_then_one_row_per_share():
    checks = StackChecks()
    checks.add("greedy == cpu", "4/4 prompts, 16 tokens each")
    checks.add("MPS clients", "prefill 11, decode 12 of 3 clients")
    checks.add("SMs (driver)", "132 (cuDeviceGetAttribute MULTIPROCESSOR_COUNT), sm_90, 80 GiB")
    checks.add("green contexts", "split ok: 30%->40, 50%->72, 100%->132 SMs (min 8, alignment 8)")
    shares = [{"percentage": "30", "sms": 40, "sms_total": 132, "prefill_tok_s": 51234.4, "decode_tok_s": 2100.2,
               "probe_error": None, "driver_sms": 132},
              {"percentage": "100", "sms": None, "sms_total": None, "prefill_tok_s": 90000.0, "decode_tok_s": None,
               "probe_error": "native library not found: build it with `make native`"},
              {"percentage": "50", "error": "CUDA error: out of memory"}]
    table = render("NVIDIA H100 (132 SMs)", checks, shares).splitlines()
    assert table[0] == "duoserve gpu-check on NVIDIA H100 (132 SMs)"
    assert any(line.startswith("greedy == cpu") and "4/4" in line for line in table)
    rows = [line.split() for line in table if line.strip().split(" ")[0].endswith("%")]
    assert any(line.startswith("green contexts") and "30%->40" in line for line in table)
    assert rows[0][:5] == ["30%", "40/132", "132", "51234", "2100"]        # probe, then the driver's count
    assert rows[1][:5] == ["100%", "n/a", "n/a", "90000", "n/a"] and "make" in " ".join(rows[1])
    assert rows[2][:5] == ["50%", "n/a", "n/a", "n/a", "n/a"] and "out of memory" in " ".join(rows[2])
