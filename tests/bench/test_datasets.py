"""Workloads: the Azure trace loader on real rows, vLLM's random dataset, prompt files, token ids from text."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.datasets import (DEFAULT_AZURE_CONV, RequestSpec, load_azure_conv, load_prompt_file, random_requests,
                            with_token_ids)

HEAD = Path(__file__).parent / "data" / "azure_conv_2023_head.csv"   # the trace's first 12 rows (see data/README.md)


def test_azure_conv_keeps_real_lengths_and_arrival_times():
    specs = load_azure_conv(HEAD, length_scale=1.0)
    assert len(specs) == 12
    assert [(s.prompt_len, s.output_len) for s in specs[:3]] == [(374, 44), (396, 109), (879, 55)]
    assert specs[0].arrival_s == 0.0
    assert specs[1].arrival_s == pytest.approx(50.9951690 - 46.6805900)      # 18:15:50.995169 - 18:15:46.68059
    assert specs[-1].arrival_s == pytest.approx(56.1080580 - 46.6805900)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(specs, specs[1:]))


def test_azure_conv_scales_lengths_and_rate_and_skips_the_start():
    specs = load_azure_conv(HEAD, length_scale=0.1, rate_scale=2.0, max_requests=4)
    assert [(s.prompt_len, s.output_len) for s in specs] == [(37, 4), (40, 11), (88, 6), (9, 2)]
    assert specs[1].arrival_s == pytest.approx((50.9951690 - 46.6805900) / 2)
    tiny = load_azure_conv(HEAD, length_scale=0.001)
    assert min(min(s.prompt_len, s.output_len) for s in tiny) == 1           # never below one token
    later = load_azure_conv(HEAD, length_scale=1.0, start_offset_s=5.0)
    assert later[0].prompt_len == 91 and later[0].arrival_s == 0.0           # 18:15:52.57 is the first >= +5 s
    capped = load_azure_conv(HEAD, length_scale=1.0, max_total_len=200)
    assert all(s.prompt_len + s.output_len <= 200 for s in capped)
    assert capped[1].output_len == 109                                        # the output keeps its length


def test_azure_conv_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_azure_conv(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="no requests"):
        load_azure_conv(HEAD, start_offset_s=3600)


@pytest.mark.skipif(not DEFAULT_AZURE_CONV.exists(), reason="bench/data/azure_conv_2023.csv is missing")
def test_the_sample_is_the_head_of_the_shared_trace():
    full = load_azure_conv(DEFAULT_AZURE_CONV, length_scale=1.0, max_requests=12)
    assert full == load_azure_conv(HEAD, length_scale=1.0)


def test_random_lengths_stay_in_range_and_follow_the_seed():
    specs = random_requests(500, input_len=100, output_len=20, range_ratio=0.5, seed=3)
    assert all(50 <= s.prompt_len <= 150 and 10 <= s.output_len <= 30 for s in specs)
    assert len({s.prompt_len for s in specs}) > 50
    assert specs == random_requests(500, 100, 20, 0.5, seed=3)
    assert specs != random_requests(500, 100, 20, 0.5, seed=4)
    assert {(s.prompt_len, s.output_len) for s in random_requests(5, 64, 8)} == {(64, 8)}
    with pytest.raises(ValueError, match="range ratio"):
        random_requests(5, 64, 8, range_ratio=1.0)


def test_prompt_file_takes_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("What is the capital of France?\n\n  Write a haiku.  \n")
    specs = load_prompt_file(path, output_len=8)
    assert [s.prompt for s in specs] == ["What is the capital of France?", "Write a haiku."]
    assert all(s.output_len == 8 for s in specs)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_file(path, 8)


def test_token_ids_are_windows_of_the_corpus_and_differ_per_request():
    corpus = list(range(1000, 1050))
    specs = with_token_ids([RequestSpec(10, 1), RequestSpec(120, 1), RequestSpec(5, 1, prompt="hi")], corpus)
    assert len(specs[0].token_ids) == 10 and len(specs[1].token_ids) == 120   # longer than the corpus: wraps
    assert set(specs[1].token_ids) == set(corpus)
    assert specs[0].token_ids[:5] != specs[1].token_ids[:5]
    assert specs[2].token_ids is None and specs[2].prompt == "hi"
