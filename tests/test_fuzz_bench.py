"""tests/benchmarks/bench_fuzz_scoring.py, small: fuzzed completions score without an exception or a hang,
and the benchmark does catch both (a score that raises, a call that hangs)."""
import time
from types import SimpleNamespace

from tests.benchmarks import bench_fuzz_scoring as bench


def test_fuzzed_completions_score_without_exceptions():
    report = bench.fuzz(500, seed=1)
    assert report.completions >= 500
    assert report.exceptions == 0, report.samples
    assert report.slow == 0, report.slowest
    assert len(report.categories) >= 3  # the inputs reach several verdicts, not only format errors


def test_an_exception_in_score_is_counted_and_fails_the_run(monkeypatch, capsys):
    real = bench.score

    def failing(text, example, *args):
        if "program" in text:
            raise ValueError("boom")
        return real(text, example, *args)

    monkeypatch.setattr(bench, "score", failing)
    report = bench.fuzz(100, seed=1)
    assert report.exceptions > 0 and report.by_type == {"ValueError": report.exceptions}
    assert report.samples["ValueError"][0] == "score" and "program" in report.samples["ValueError"][1]
    assert bench.main(["--n", "40"]) == 1
    assert "exceptions: 0" not in capsys.readouterr().out


def test_a_hanging_call_is_interrupted_and_counted(monkeypatch):
    calls = []

    def hanging(text, example, *args):
        calls.append(text)
        time.sleep(60 if len(calls) == 1 else 0)  # the first call hangs
        return SimpleNamespace(category="correct")

    monkeypatch.setattr(bench, "score", hanging)
    started = time.perf_counter()
    report = bench.fuzz(4, seed=1, max_call_s=0.2)
    assert time.perf_counter() - started < 30
    assert report.slow >= 1 and report.slowest[0] < 5
