"""Which segments a restarted arena re-opens (services/arena/segments.py): a dead arena's set is made
by a real child process on a tiny model, then looked for from this one."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from duoserve.stack_procs import arena_memory
from services.arena import segments
from services.common.shm import create_segment, list_segments, owned_name, segment_owner, unlink_segment
from services.engine.kv_cache import KVCacheSpec
from services.engine.model_config import ModelConfig

REPO = Path(__file__).resolve().parents[2]
TINY = ModelConfig("LlamaForCausalLM", vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=1,
                   num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                   max_position=64, tie_word_embeddings=True, has_qkv_bias=False, bos_token_id=None,
                   eos_token_ids=(2,))
SPEC = KVCacheSpec.for_model(TINY, 16, torch.float32, num_blocks=4)

# What an arena does when it makes a set, in a process that then dies without cleaning up.
DEAD_ARENA = """
    import sys, torch
    from pathlib import Path
    from services.arena import segments
    from services.arena.export import ArenaExport, KVLayout, model_config_to_dict
    from services.common.shm import create_segment, owned_name
    from services.common.weights_pack import layout, pack_into
    from services.engine.loader import expected_shapes
    sys.path.insert(0, sys.argv[3])
    from test_segments import SPEC, TINY, made_from
    prefix, model_dir, parts = sys.argv[1], Path(sys.argv[2]), sys.argv[4].split(",")
    weights = {name: torch.full(shape, 0.5) for name, shape in expected_shapes(TINY).items()}
    manifest, size = layout(weights)
    w = create_segment(owned_name(prefix, "weights"), size)
    pack_into(w.tensor(), weights, manifest)
    kv = create_segment(owned_name(prefix, "kv"), SPEC.num_bytes)
    kv.tensor()[:8] = 7
    document = ArenaExport(0, w.name, manifest, kv.name, KVLayout(1, 4, 16, 1, 4, "float32"), str(model_dir),
                           str(model_dir / "config.json"), model_config_to_dict(TINY))
    if "record" in parts:
        segments.write_record(prefix, document, made_from(model_dir))
"""


def made_from(model_dir: Path) -> dict:
    return segments.identity(model_dir, "float32", SPEC)


@pytest.fixture
def prefix():
    p = f"duoserve-seg{uuid.uuid4().hex[:8]}-"
    yield p
    for name in list_segments(p):
        unlink_segment(name)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def _dead_arena(prefix: str, model_dir: Path, parts: str = "record") -> int:
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(DEAD_ARENA), prefix, str(model_dir),
                            str(Path(__file__).parent), parts], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    owners = {segment_owner(name, prefix) for name in list_segments(prefix)}
    assert len(owners) == 1
    return owners.pop()


def test_a_dead_arenas_matching_set_is_renamed_to_this_process_with_its_memory(prefix, model_dir):
    dead = _dead_arena(prefix, model_dir)
    memory = arena_memory(prefix)                       # what the supervisor compares across the restart
    found = segments.reopen(prefix, made_from(model_dir), TINY, torch.float32)
    assert found is not None
    assert arena_memory(prefix) == memory and len(memory) == 2
    mine = sorted(owned_name(prefix, kind) for kind in segments.KINDS)
    assert list_segments(prefix) == mine and dead != os.getpid()
    assert found.document.arena_pid == os.getpid()
    assert (found.document.weights_segment, found.document.kv_segment) == (found.weights.name, found.kv.name)
    assert found.kv.tensor()[:8].tolist() == [7] * 8                       # the KV as it was left
    assert found.kv.size == SPEC.num_bytes
    unlink_segment(found.kv.name)                       # a new pool instead: the workers must restart
    create_segment(found.kv.name, SPEC.num_bytes)
    assert arena_memory(prefix) != memory


def test_a_set_made_for_something_else_or_never_finished_is_not_reopened(prefix, model_dir, caplog):
    _dead_arena(prefix, model_dir)
    other = dict(made_from(model_dir), kv_shape=[1, 2, 8, 1, 16, 4])     # another pool size
    assert segments.reopen(prefix, other, TINY, torch.float32) is None
    assert "made from kv_shape" in caplog.text
    (model_dir / "config.json").write_text('{"changed": 1}')              # the checkpoint changed
    assert segments.reopen(prefix, made_from(model_dir), TINY, torch.float32) is None
    for name in list_segments(prefix):
        unlink_segment(name)
    _dead_arena(prefix, model_dir, parts="")                               # died before its record
    assert segments.reopen(prefix, made_from(model_dir), TINY, torch.float32) is None
    assert "no record segment" in caplog.text
