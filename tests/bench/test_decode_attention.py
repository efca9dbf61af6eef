"""`python -m bench.decode_attention` runs end to end on a tiny shape and prints its table."""
from __future__ import annotations

import pytest

from bench import decode_attention
from services.engine import cpu_ops


@pytest.mark.skipif(not cpu_ops.load(), reason="CPU kernels not built: run `make cpu-ops`")
def test_decode_attention_benchmark_prints_one_row_per_shape(capsys):
    argv = ["--contexts", "40,300", "--batch-sizes", "1,2", "--repeats", "2", "--flush-mb", "1"]
    assert decode_attention.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[:2] for row in rows] == [["| 1", "40"], ["| 1", "300"], ["| 2", "40"], ["| 2", "300"]]
