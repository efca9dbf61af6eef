"""The orchestrator's start-up on each device, against a real Redis holding a stack's model info and
two workers' reports (no worker, no GPU): on "cuda" its model is the GPU prior over the SMs the workers
measured, and the Admin API says so; on the CPU, the stack's cores as before."""
from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

from orchestrator.admin import AdminServicer
from orchestrator.config import OrchestratorConfig
from orchestrator.main import build_controller
from services.common import stream_entries
from services.common.contracts import WorkerReport
from services.common.model_info import ModelInfo, write_model_info
from services.common.shares import UnitSpace

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256}


def _stack(redis_client, keys, tmp_path, units_kind: str, units_used: int, units_total: int, share: float) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    write_model_info(redis_client, keys.model_info, ModelInfo("m", str(tmp_path), "LlamaForCausalLM", 128256, 8192,
                                                              16, 1024, (2,), "bfloat16", "split"))
    for phase in ("prefill", "decode"):
        report = WorkerReport(phase, f"{phase}-1", "127.0.0.1:1", share, (), 0, 0, 0, 0, 1024, 1024, time.time(),
                              units_kind=units_kind, units_used=units_used, units_total=units_total)
        redis_client.hset(keys.worker_stats(phase), mapping=stream_entries.report_mapping(report))


def _config(redis_server, keys, **overrides) -> OrchestratorConfig:
    return OrchestratorConfig(redis_url=redis_server.url, key_prefix=keys.prefix, port=1, **overrides)


def test_on_cuda_the_model_is_the_gpu_prior_over_the_measured_sms(redis_server, redis_client, keys, tmp_path):
    _stack(redis_client, keys, tmp_path, "sm", 56, 114, 0.5)          # an H100 PCIe, each worker capped at 50%
    controller = build_controller(_config(redis_server, keys, device="cuda", stack_cpus=(0, 1)), redis_client,
                                  threading.Event())
    assert controller.model.device.kind == "gpu" and controller.model.units == UnitSpace.cuda(114)
    fit = AdminServicer(controller, controller.model.device.kind).GetModelFit(None, SimpleNamespace())
    assert (fit.backend, fit.unit, fit.num_units) == ("gpu", "sm", 114)
    assert controller.default_shares().prefill == 56 / 114


def test_a_capped_sm_count_is_undone_and_num_sms_overrides(redis_server, redis_client, keys, tmp_path):
    _stack(redis_client, keys, tmp_path, "sm", 66, 66, 0.5)           # the context reported its capped count
    cuda = _config(redis_server, keys, device="cuda")
    assert build_controller(cuda, redis_client, threading.Event()).model.units.num_units == 132
    pinned = _config(redis_server, keys, device="cuda", num_sms=78)
    assert build_controller(pinned, redis_client, threading.Event()).model.units.num_units == 78


def test_on_the_cpu_the_model_is_the_stacks_cores(redis_server, redis_client, keys, tmp_path):
    _stack(redis_client, keys, tmp_path, "core", 1, 2, 0.5)
    controller = build_controller(_config(redis_server, keys, stack_cpus=(0, 1)), redis_client, threading.Event())
    assert controller.model.device.kind == "cpu" and controller.model.units == UnitSpace.cpu(2)
