"""benchmarks/compare.py groups saved records by sweep kind and backend and tabulates them."""
import json
import math

from benchmarks.compare import load, plot, table


def _record(tmp_path, backend: str, rate: float, concurrency: int | None, tok_s: float):
    summary = {"output_throughput": tok_s, "ttft_ms": {"median": 10.0, "p99": 20.0},
               "tpot_ms": {"median": 30.0, "p99": 40.0}}
    path = tmp_path / f"{backend}-{rate}-{concurrency}.json"
    path.write_text(json.dumps({"config": {"backend": backend, "request_rate": rate,
                                           "max_concurrency": concurrency}, "summary": summary}))
    return path


def test_records_group_by_sweep_kind_and_backend_and_tabulate(tmp_path):
    paths = [_record(tmp_path, "a", math.inf, 8, 50.0), _record(tmp_path, "a", math.inf, 1, 15.0),
             _record(tmp_path, "b", math.inf, 8, 70.0), _record(tmp_path, "a", 0.5, None, 12.0),
             _record(tmp_path, "a", math.inf, None, 60.0)]
    grouped = load(paths)
    assert set(grouped) == {"concurrency", "request rate"}
    assert grouped["concurrency"]["a"][8.0]["output_throughput"] == 50.0
    assert sorted(grouped["request rate"]["a"]) == [0.5, math.inf]
    lines = table("concurrency", grouped["concurrency"]).splitlines()
    assert lines[2:] == ["| a | 1 | 15.0 | 10 / 20 | 30 / 40 |", "| a | 8 | 50.0 | 10 / 20 | 30 / 40 |",
                         "| b | 8 | 70.0 | 10 / 20 | 30 / 40 |"]
    assert "| a | inf | 60.0 |" in table("request rate", grouped["request rate"])
    assert plot("request rate", grouped["request rate"], tmp_path / "png").stat().st_size > 0
