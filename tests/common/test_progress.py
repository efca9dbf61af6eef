"""Progress bars of long work: drawn on a terminal, nothing at all elsewhere (logs, pipes, CI)."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from bench.serve import Progress
from services.common.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# Patched in the test's body: pytest's capture sets sys.stderr afresh between a fixture and the test.
def _stderr(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO) -> io.StringIO:
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def test_a_bar_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _stderr(monkeypatch, _Terminal())
    assert list(progress(range(3), desc="counting")) == [0, 1, 2]
    assert "counting" in terminal.getvalue() and "/3" in terminal.getvalue()


def test_nothing_off_a_terminal_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = _stderr(monkeypatch, io.StringIO())
    assert list(progress(range(3), desc="counting")) == [0, 1, 2]
    assert pipe.getvalue() == ""
    terminal = _stderr(monkeypatch, _Terminal())
    assert list(progress(range(3), desc="counting", enabled=False)) == [0, 1, 2]      # --no-progress
    assert terminal.getvalue() == ""


def _bench_run(label: str) -> None:
    bar = Progress(2, label)
    bar.sent(), bar.sent()
    bar.finished(True), bar.finished(False)
    bar.close()


def test_bench_serve_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _stderr(monkeypatch, _Terminal())
    _bench_run("split @ 2 req/s")
    assert "split @ 2 req/s" in terminal.getvalue() and "running=" in terminal.getvalue()


def test_bench_serve_quiet_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = _stderr(monkeypatch, io.StringIO())
    _bench_run("split @ 2 req/s")
    assert pipe.getvalue() == ""


@pytest.fixture(scope="module")
def gguf_reader():
    """The default GGUF's reader, parsed once (seconds: its vocabulary is in the metadata)."""
    import gguf

    from services.engine.loader import find_default_gguf
    return gguf.GGUFReader(str(find_default_gguf()))


def _convert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader) -> None:
    """A real GGUF's metadata, the slow steps (dequantize, write, tokenizer) replaced by steps of the bar."""
    import gguf

    from services.engine import loader

    def tensors(reader, config, bar):
        for _ in reader.tensors:
            bar.update()
        return {}

    monkeypatch.setattr(gguf, "GGUFReader", lambda path: reader)
    monkeypatch.setattr(loader, "_hf_tensors", tensors)
    monkeypatch.setattr(loader, "save_file", lambda *a, **k: None)
    monkeypatch.setattr(loader, "_save_tokenizer", lambda *a: None)
    loader.convert_gguf_to_hf(loader.find_default_gguf(), tmp_path / "converted")


def test_conversion_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gguf_reader) -> None:
    terminal = _stderr(monkeypatch, _Terminal())
    _convert(tmp_path, monkeypatch, gguf_reader)
    assert "converting" in terminal.getvalue() and ".gguf" in terminal.getvalue()


def test_conversion_quiet_off_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gguf_reader) -> None:
    pipe = _stderr(monkeypatch, io.StringIO())
    _convert(tmp_path, monkeypatch, gguf_reader)
    assert pipe.getvalue() == ""
