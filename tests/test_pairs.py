"""`duoserve up --pairs N`: the plan of a stack of pairs (pure: no process starts here)."""
from __future__ import annotations

from pathlib import Path

import pytest

from duoserve import stack_plan
from duoserve.pairs import divide_cores, name_in_pair, pair_key_prefix, pair_of, role_of, sibling
from duoserve.stack_plan import Layout, Mode, StackConfig, lost_with, restart_with


def _config(tmp_path: Path, **overrides) -> StackConfig:
    return StackConfig(**{"state_dir": tmp_path / "state", "cache_dir": tmp_path / "models", "cpus": (0, 1),
                          **overrides})


def _plan(config: StackConfig) -> dict[str, stack_plan.ProcessSpec]:
    names = [n for stage in stack_plan.stage_names(config) for n in stage]
    ports = {n: (1000 + 3 * i, 2000 + 3 * i, 3000 + 3 * i) for i, n in enumerate(names)}
    return {p.name: p for stage in stack_plan.plan(config, Layout.new(config.stack_dir), ports) for p in stage}


def _flag(spec: stack_plan.ProcessSpec, flag: str) -> str:
    return spec.argv[spec.argv.index(flag) + 1]


def test_names_and_key_spaces_of_pairs():
    assert name_in_pair("prefill", 0, 1) == "prefill" and name_in_pair("prefill", 1, 2) == "prefill-p1"
    assert (role_of("decode-p3"), pair_of("decode-p3"), role_of("gateway"), pair_of("gateway")) == ("decode", 3, "gateway", 0)
    assert sibling("arena-p1", "decode") == "decode-p1" and sibling("arena", "decode") == "decode"
    assert pair_key_prefix("duo:x", 0, 1) == "duo:x" and pair_key_prefix("duo:x", 1, 2) == "duo:x:p1"


def test_cores_are_divided_between_pairs_and_a_pair_needs_one():
    assert divide_cores((0, 1, 2, 3, 4), 2) == [(0, 1, 2), (3, 4)]
    assert divide_cores((0, 1), 2) == [(0,), (1,)]
    with pytest.raises(ValueError, match="at least 3 cores"):
        divide_cores((0, 1), 3)


def test_two_pairs_each_with_its_own_keys_memory_socket_and_cores(tmp_path):
    config = _config(tmp_path, pairs=2)
    specs = _plan(config)
    assert set(specs) == {"redis", "gateway", *(f"{r}-p{i}" for r in ("arena", "prefill", "decode", "orchestrator")
                                                for i in (0, 1))}
    base = _flag(specs["gateway"], "--key-prefix")
    assert _flag(specs["gateway"], "--pair-prefixes") == f"{base}:p0,{base}:p1"
    for i in (0, 1):
        for role in ("arena", "prefill", "decode", "orchestrator"):
            assert _flag(specs[f"{role}-p{i}"], "--key-prefix") == f"{base}:p{i}"
        socket = _flag(specs[f"arena-p{i}"], "--socket")
        assert _flag(specs[f"prefill-p{i}"], "--arena-socket") == socket == _flag(specs[f"decode-p{i}"], "--arena-socket")
        assert _flag(specs[f"arena-p{i}"], "--stack-id").endswith(f"_p{i}")
        assert _flag(specs[f"prefill-p{i}"], "--cpus") == _flag(specs[f"decode-p{i}"], "--cpus") == str(i)
        assert _flag(specs[f"prefill-p{i}"], "--stack-cpus") == _flag(specs[f"orchestrator-p{i}"], "--cpus") == str(i)
    assert _flag(specs["arena-p0"], "--socket") != _flag(specs["arena-p1"], "--socket")
    assert len({s.split("=")[0] for s in specs["gateway"].argv if "=127.0.0.1:" in s}) == 8   # every peer's metrics


def test_one_pair_is_planned_as_before(tmp_path):
    specs = _plan(_config(tmp_path))
    assert {"arena", "prefill", "decode", "orchestrator"} <= set(specs)
    assert "--pair-prefixes" not in specs["gateway"].argv and "--stack-cpus" not in specs["prefill"].argv
    assert _flag(specs["prefill"], "--key-prefix") == _flag(specs["gateway"], "--key-prefix")


def test_an_arena_restart_takes_its_own_pairs_workers_only():
    assert restart_with("arena-p1", "cpu", memory_kept=False) == ("prefill-p1", "decode-p1")
    assert restart_with("arena", "cpu", memory_kept=False) == ("prefill", "decode")
    assert lost_with("arena-p0", "cuda") == ("prefill-p0", "decode-p0")
    assert restart_with("prefill-p1", "cpu", memory_kept=False) == ()


def test_pairs_refuse_what_they_cannot_run(tmp_path):
    for overrides, message in (({"mode": Mode.COLOCATED}, "split mode"), ({"device": "cuda"}, "CPU only"),
                               ({"prefill_cpus": (0,)}, "divided"), ({"cpus": (0,)}, "at least 2 cores")):
        with pytest.raises(ValueError, match=message):
            _config(tmp_path, pairs=2, **overrides)


def test_the_cli_takes_pairs(tmp_path):
    from duoserve.cli import build_parser, stack_config_from_args
    args = build_parser().parse_args(["up", "--pairs", "2", "--cpus", "0-1", "--state-dir", str(tmp_path)])
    assert stack_config_from_args(args).pairs == 2
