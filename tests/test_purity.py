"""Pure modules import no torch, grpc or redis: checked in a fresh interpreter."""
from __future__ import annotations

import subprocess
import sys

import pytest

PURE_MODULES = [
    "services.engine.scheduler",
    "services.engine.blocks",
    "services.engine.prefix_hash",
    "services.common.redis_block_scripts",
    "services.engine.sequence",
    "services.engine.sampling_params",
    "services.engine.model_config",
    "services.engine.output",
    "services.gateway.inflight",       # the gateway's per-request output (re-attach)
    "services.gateway.follower",
    "services.common.mps",             # the supervisor imports it: `duoserve down` stays instant
    "services.arena.cuda_export",      # torch only inside describe/rebuild
    "services.common.stream_entries",  # the wire format: its callers own their Redis clients
    "orchestrator.coresidency",        # the policy and the simulator call it per prediction
    "orchestrator.policy",
    "orchestrator.hold",               # the policy's time hysteresis
    "orchestrator.simulator",
    "orchestrator.prefix_view",        # the waiting prompts' block keys: the orchestrator and the simulator
    "bench.corun",                     # gpu-check imports it before it knows there is a GPU
    "services.common.shares",          # share <-> units <-> MPS percentage: orchestrator, workers, simulator
    "services.gateway.routing",        # which pair a request goes to
    "services.common.cuda_driver",     # cuda-python only inside its calls: imports on a machine without CUDA
]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_nothing_heavy(module):
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'grpc', 'redis', 'transformers') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulled in {out.stdout.strip()}"
