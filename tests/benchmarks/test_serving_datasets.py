"""Benchmark request sets: seeded, within their length bounds, made of real words."""

import json

import pytest

from benchmarks.datasets import VOCABULARY, random_requests, sharegpt_requests, synthetic_requests


def test_synthetic_is_seeded_and_within_bounds():
    a = synthetic_requests(300, seed=3)
    assert a == synthetic_requests(300, seed=3)
    assert a != synthetic_requests(300, seed=4)
    words = [len(r.prompt.split()) for r in a]
    outs = [r.max_tokens for r in a]
    assert 12 <= min(words) and max(words) <= 300
    assert 16 <= min(outs) and max(outs) <= 160
    # The ranges are actually used, not collapsed to a constant.
    assert max(words) - min(words) > 200 and max(outs) - min(outs) > 100
    assert len({r.prompt for r in a}) > 290


def test_synthetic_custom_ranges():
    reqs = synthetic_requests(50, seed=0, prompt_words=(5, 5), output_tokens=(1, 1))
    assert all(len(r.prompt.split()) == 5 and r.max_tokens == 1 for r in reqs)
    with pytest.raises(ValueError):
        synthetic_requests(1, prompt_words=(10, 5))


def test_random_lengths_prefix_and_words():
    reqs = random_requests(200, seed=7, input_len=100, output_len=50, range_ratio=0.2, prefix_len=30)
    assert reqs == random_requests(200, seed=7, input_len=100, output_len=50, range_ratio=0.2, prefix_len=30)
    prefix = reqs[0].prompt.split()[:30]
    vocab = set(VOCABULARY)
    for r in reqs:
        words = r.prompt.split()
        assert words[:30] == prefix
        assert 80 <= len(words) - 30 <= 120
        assert 40 <= r.max_tokens <= 60
        assert set(words) <= vocab
    fixed = random_requests(20, seed=7, input_len=64, output_len=8)
    assert all(len(r.prompt.split()) == 64 and r.max_tokens == 8 for r in fixed)
    with pytest.raises(ValueError):
        random_requests(1, range_ratio=1.0)


def test_vocabulary_is_real_words():
    assert len(VOCABULARY) > 300
    assert {"harbour", "engineer", "garden", "library"} & set(VOCABULARY)
    assert all(w.replace("'", "").isalpha() for w in VOCABULARY)


def test_sharegpt_first_human_gpt_pair(tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "one two three"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "Q"},
                           {"from": "gpt", "value": "a b c d e f"}]},
        {"conversations": [{"from": "human", "value": "unanswered"}]},
        {"conversations": []},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    reqs = sharegpt_requests(path, 2, seed=0, count_tokens=lambda s: len(s.split()))
    assert sorted((r.prompt, r.max_tokens) for r in reqs) == [("Hi?", 3), ("Q", 6)]
    # Without a tokenizer: 4 tokens per 3 words, rounded up.
    assert sorted(r.max_tokens for r in sharegpt_requests(path, 2)) == [4, 8]
    assert {r.max_tokens for r in sharegpt_requests(path, 2, output_len=9)} == {9}
    with pytest.raises(ValueError):
        sharegpt_requests(path, 3)
