"""bench.prefix_ttft's pure parts: the report table and the argument check (the run itself starts
stacks: docs/performance.md has its figures)."""
from __future__ import annotations

import pytest

from bench.prefix_ttft import Send, main, report


def test_the_report_has_each_round_and_the_medians(capsys):
    cached = [(Send(4.0, 3990.0, 0), Send(0.2, 190.0, 1472)), (Send(5.0, 4990.0, 0), Send(0.1, 90.0, 1472))]
    report({"cached": cached, "uncached": [(Send(4.0, 3990.0, 0), Send(4.4, 4390.0, 0))]}, 1483)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("1483-token prompt")
    assert [line.split()[:2] for line in lines[2:]] == [["cached", "1"], ["cached", "2"], ["cached", "med"],
                                                        ["uncached", "1"], ["uncached", "med"]]
    assert "1472" in lines[2] and lines[4].split()[-1] == "0.03x" and lines[-1].split()[-1] == "1.10x"


def test_an_unknown_setting_is_refused():
    with pytest.raises(SystemExit):
        main(["--settings", "cached,warm"])
