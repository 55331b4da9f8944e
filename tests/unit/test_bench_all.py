"""bench/all.py, the `make bench` runner, on fake benchmarks: tiny scripts that print markdown and a
BENCH_SUMMARY line, fail, or forget the line. No real benchmark runs."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runner():
    # bench/ is not a package (its scripts run as files), so the runner is loaded from its path
    spec = importlib.util.spec_from_file_location("bench_all", ROOT / "bench" / "all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_all"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_all"]


def fake(runner, tmp_path, name, code, figures=()):
    script = tmp_path / f"{name}.py"
    script.write_text(code)
    return runner.Benchmark(name, script, [], [], 0.01, list(figures))


def test_split_output_strips_the_summary_line_and_keeps_the_last(runner):
    markdown, summary = runner.split_output(
        '## A\n| x |\nBENCH_SUMMARY {"ratio": 1.0}\nmore\nBENCH_SUMMARY {"ratio": 2.5, "n": 3}\n')
    assert markdown == "## A\n| x |\nmore"
    assert summary == {"ratio": 2.5, "n": 3}
    assert runner.split_output("## only markdown\n") == ("## only markdown", None)


def test_fill_formats_fields_and_marks_missing_ones(runner):
    assert runner.fill("{tok:,.0f} tok/s at {c} trees", {"tok": 1234.5, "c": 32}) == "1,234 tok/s at 32 trees"
    assert runner.fill("{tok:,.0f} tok/s", {}) == "n/a tok/s"


def test_summary_rows_check_targets(runner, tmp_path):
    figures = [
        runner.Figure("tree {tree:.0f}", "plain {plain:.0f}", "ratio", at_least=0.8),
        runner.Figure("slow", "base", "slow_ratio", at_most=1.2),
        runner.Figure("no target", "base", "ratio"),
        runner.Figure("missing", "base", "absent", at_least=1.0),
        runner.Figure("count {n}"),
    ]
    bench = runner.Benchmark("b", tmp_path / "b.py", [], [], 1.0, figures)
    run = runner.Run(bench, "python b.py", 1.0, (0.0, 0.0), summary={"tree": 90, "plain": 100, "ratio": 0.9,
                                                                      "slow_ratio": 1.5, "n": 4})
    assert runner.summary_rows(run) == [
        "| b | tree 90 | plain 100 | 0.90 | >= 0.8 | yes |",
        "| b | slow | base | 1.50 | <= 1.2 | **no** |",
        "| b | no target | base | 0.90 | - | - |",
        "| b | missing | base | n/a | >= 1 | - |",
        "| b | count 4 | - | - | - | - |",
    ]


def test_a_failed_benchmark_is_recorded_and_the_others_still_run(runner, tmp_path):
    ok = fake(runner, tmp_path, "ok", 'print("## Fast | thing\\n\\n| a |\\n| --- |\\n| 1 |")\n'
              'print(\'BENCH_SUMMARY {"speed": 2.0, "ratio": 1.25}\')\n',
              [runner.Figure("speed {speed:.1f}", "baseline", "ratio", at_least=1.0)])
    crash = fake(runner, tmp_path, "crash", 'import sys\nprint("half a table")\n'
                 'sys.stderr.write("loading\\nValueError: boom\\nUserWarning: leaked semaphore at shutdown\\n")\n'
                 'sys.exit(3)\n')
    silent = fake(runner, tmp_path, "silent", 'print("markdown but no summary")\n')
    results = tmp_path / "out" / "results.md"

    code = runner.run_all([crash, ok, silent], results, quick=False, command="python bench/all.py")

    assert code == 1
    text = results.read_text()
    assert "Failed: crash, silent." in text
    assert "| crash | **FAILED**: exit code 3: ValueError: boom | | | | |" in text
    assert "| silent | **FAILED**: no BENCH_SUMMARY line on stdout | | | | |" in text
    assert "| ok | speed 2.0 | baseline | 1.25 | >= 1 | yes |" in text
    assert "### Fast | thing" in text  # the benchmark's own heading, one level down
    assert "BENCH_SUMMARY" not in text.split("## ok")[1].split("## silent")[0]  # the line is stripped
    assert "ValueError: boom" in text.split("## crash")[1].split("## ok")[0]  # stderr's end in the failed section
    assert text.index("## crash") < text.index("## ok") < text.index("## silent")  # in the order run


def test_all_passing_exits_zero(runner, tmp_path):
    ok = fake(runner, tmp_path, "ok", "print('BENCH_SUMMARY {}')\n")
    assert runner.run_all([ok], tmp_path / "r.md", quick=True, command="x") == 0
    assert "Failed: none." in (tmp_path / "r.md").read_text()


def test_summary_from_main_prints_what_main_returns(runner, tmp_path):
    script = tmp_path / "returns.py"
    script.write_text("def main(argv):\n    print('## table', argv)\n    return {'ratio': float(argv[0])}\n")
    bench = runner.Benchmark("returns", script, ["0.5"], [], 0.01, [runner.Figure("r", "b", "ratio", at_most=1.2)],
                             summary_from_main=True)
    run = runner.run_benchmark(bench, quick=False)
    assert run.error is None
    assert run.summary == {"ratio": 0.5}
    assert run.markdown == "## table ['0.5']"
