"""Shared-memory segments and weight packing, across real processes (no mocks)."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch

from services.common.shm import (SHM_DIR, attach_segment, create_segment, list_segments, owned_name, pid_alive,
                                 reclaim_segments, rename_segment, segment_owner, unlink_segment)
from services.common.weights_pack import ALIGNMENT, layout, pack, pack_into, packed_nbytes, unpack

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def prefix():
    """A segment-name prefix of this test alone; whatever is left under it is unlinked afterwards."""
    p = f"duoserve-test{uuid.uuid4().hex[:8]}-"
    yield p
    for name in list_segments(p):
        unlink_segment(name)


def run_python(code: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter at the repository root."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(37, 11, generator=g),                       # odd sizes: offsets need alignment
        "norm": torch.randn(11, generator=g).to(torch.bfloat16),
        "transposed": torch.randn(5, 7, generator=g).t(),                # non-contiguous input
        "ids": torch.arange(13, dtype=torch.int64),
        "half": torch.randn(3, 3, generator=g).to(torch.float16),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }


# ---------------------------------------------------------------------------------------------- packing

def test_pack_unpack_round_trip_is_exact_aligned_and_zero_copy():
    tensors = sample_tensors()
    buffer, manifest = pack(tensors)
    assert json.loads(json.dumps(manifest)) == manifest                   # plain JSON, no pickle
    assert list(manifest) == list(tensors)
    assert all(entry["offset"] % ALIGNMENT == 0 for entry in manifest.values())
    assert buffer.numel() >= packed_nbytes(manifest)

    views = unpack(buffer, json.loads(json.dumps(manifest)))
    for name, t in tensors.items():
        assert views[name].dtype == t.dtype and views[name].shape == t.shape
        assert torch.equal(views[name], t), name
    base, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    for name, v in views.items():
        assert v.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr(), name   # views, not copies
        assert v.numel() == 0 or base <= v.data_ptr() < end
    buffer[manifest["ids"]["offset"]: manifest["ids"]["offset"] + 8].copy_(
        torch.tensor([99], dtype=torch.int64).view(torch.uint8))
    assert views["ids"][0].item() == 99                                   # a write to the buffer shows in the view


def test_unpack_rejects_a_manifest_that_does_not_fit_the_buffer():
    buffer, manifest = pack({"w": torch.ones(4, 4)})
    bad = {
        "past the end": {"w": {**manifest["w"], "offset": 64, "shape": [64, 4], "nbytes": 1024}},
        "unaligned": {"w": {**manifest["w"], "offset": 4}},
        "unknown dtype": {"w": {**manifest["w"], "dtype": "object"}},
        "nbytes lies": {"w": {**manifest["w"], "nbytes": 8}},
        "negative dim": {"w": {**manifest["w"], "shape": [-4, -4]}},
    }
    for why, m in bad.items():
        with pytest.raises(ValueError):
            unpack(buffer, m)
            pytest.fail(why)
    with pytest.raises(ValueError):
        unpack(buffer.view(torch.int8), manifest)


def test_pack_into_a_segment_and_unpack_from_another_mapping(prefix):
    tensors = sample_tensors()
    manifest, size = layout(tensors)
    with create_segment(prefix + "w", size) as seg:
        pack_into(seg.tensor(), tensors, manifest)
    other = attach_segment(prefix + "w", writable=False)
    views = unpack(other.tensor(), manifest)
    assert all(torch.equal(views[n], t) for n, t in tensors.items())


# ---------------------------------------------------------------------------------------------- segments

def test_create_is_exclusive_private_and_zeroed(prefix):
    seg = create_segment(prefix + "a", 10_000)
    st = os.stat(SHM_DIR / (prefix + "a"))
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid() and st.st_size == 10_000
    assert seg.tensor().numel() == 10_000 and int(seg.tensor().sum()) == 0
    with pytest.raises(FileExistsError):
        create_segment(prefix + "a", 10)
    with pytest.raises(ValueError):
        create_segment("../etc/passwd", 10)
    assert list_segments(prefix) == [prefix + "a"]
    assert unlink_segment(prefix + "a") and not unlink_segment(prefix + "a")


def test_tensors_outlive_a_closed_handle(prefix):
    seg = create_segment(prefix + "a", 4096)
    t = seg.tensor()
    seg.close()
    t[100] = 7                                           # still mapped: the tensor keeps the mapping alive
    assert attach_segment(prefix + "a").tensor()[100].item() == 7
    with pytest.raises(ValueError):
        seg.tensor()


def test_a_write_in_one_process_is_seen_by_another(prefix):
    name = prefix + "kv"
    seg = create_segment(name, 1 << 20)
    mine = seg.tensor().view(torch.float32)
    mine[:1000] = 1.5                                   # parent -> child
    child = run_python("""
        import sys, torch
        from services.common.shm import attach_segment
        t = attach_segment(sys.argv[1]).tensor().view(torch.float32)
        print(float(t[:1000].sum()))
        t[5000:6000] = 2.25                              # child -> parent
    """, name)
    assert float(child.stdout) == 1500.0
    assert torch.all(mine[5000:6000] == 2.25) and float(mine[6000]) == 0.0


def test_a_read_only_attachment_faults_on_write_instead_of_corrupting(prefix):
    name = prefix + "weights"
    create_segment(name, 4096).tensor()[:] = 3
    child = run_python("""
        import sys, warnings
        warnings.simplefilter("error")                   # the non-writable warning must be handled inside
        from services.common.shm import attach_segment
        t = attach_segment(sys.argv[1], writable=False).tensor()
        print(int(t.sum()), flush=True)
        t[0] = 9
    """, name, check=False)
    assert child.stdout.strip() == str(3 * 4096), child.stderr
    assert child.returncode == -signal.SIGSEGV
    assert attach_segment(name).tensor()[0].item() == 3


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a segment to another user")
def test_attach_refuses_a_segment_of_another_user(prefix):
    create_segment(prefix + "x", 64)
    os.chown(SHM_DIR / (prefix + "x"), 65534, 65534)
    with pytest.raises(PermissionError):
        attach_segment(prefix + "x")


# ---------------------------------------------------------------------------------------------- owners

def test_owner_pid_is_in_the_name():
    assert owned_name("duoserve-s1-", "weights", pid=4242) == "duoserve-s1-4242-weights"
    assert segment_owner("duoserve-s1-4242-weights", "duoserve-s1-") == 4242
    assert segment_owner("duoserve-s1-2-4242-weights", "duoserve-s1-") is None    # another stack's ("s1-2")
    assert segment_owner("duoserve-s1-notes", "duoserve-s1-") is None
    with pytest.raises(ValueError):
        owned_name("duoserve-s1-", "Bad-Kind")


def test_reclaim_unlinks_a_dead_owners_segments_and_keeps_a_live_ones(prefix):
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from services.common.shm import create_segment, owned_name
        for kind in ("weights", "kv"):
            create_segment(owned_name(sys.argv[1], kind), 1 << 16)
        print("ready", flush=True)
        sys.stdin.readline()
    """), prefix], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        mine = create_segment(owned_name(prefix, "kv"), 4096)               # a live owner: this process
        create_segment(prefix + "unrelated", 64)                            # no owner in the name
        dead = [owned_name(prefix, "kv", child.pid), owned_name(prefix, "weights", child.pid)]
        assert reclaim_segments(prefix) == []                               # the child is alive
        child.kill()
        child.wait()
        assert not pid_alive(child.pid)
        assert sorted(reclaim_segments(prefix)) == sorted(dead)
        assert list_segments(prefix) == sorted([mine.name, prefix + "unrelated"])
    finally:
        child.kill()
        child.wait()


def test_a_renamed_segment_is_the_same_memory_and_never_replaces_another(prefix):
    old = create_segment(owned_name(prefix, "kv", pid=1), 4096)
    view = old.tensor()
    view[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    new_name = owned_name(prefix, "kv")
    rename_segment(old.name, new_name)
    assert list_segments(prefix) == [new_name]
    with attach_segment(new_name) as again:
        assert again.tensor()[:4].tolist() == [1, 2, 3, 4]
        again.tensor()[4] = 9
    assert int(view[4]) == 9                                               # the old mapping sees the new name's writes
    other = create_segment(owned_name(prefix, "weights", pid=1), 64)
    with pytest.raises(FileExistsError):
        rename_segment(other.name, new_name)
    assert sorted(list_segments(prefix)) == sorted([new_name, other.name])
