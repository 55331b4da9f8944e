"""Console output without a terminal (pytest's captured stdout is not one): progress as a line per interval
with rate and ETA, and the libraries' log records in the job's log file instead of on the screen."""

from __future__ import annotations

import logging
import re
import warnings

from apr_ray.console import StepProgress, route_third_party_logs


def test_progress_prints_a_line_per_interval_with_rate_and_eta(capsys):
    bar = StepProgress(10, "sft", every=4)
    for _ in range(10):
        bar.update(1, loss="0.500")
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert [re.match(r"sft: step (\d+)/10", line).group(1) for line in lines] == ["4", "8", "10"]
    assert "(40%)" in lines[0] and "step/s" in lines[0] and "ETA" in lines[0] and "loss 0.500" in lines[0]
    assert "ETA" not in lines[-1]  # nothing left


def test_progress_disabled_prints_nothing(capsys):
    bar = StepProgress(5, "grpo", enabled=False)
    for _ in range(5):
        bar.update(1)
    assert capsys.readouterr().out == ""


def test_library_logs_and_warnings_go_to_the_log_file_errors_to_stderr(tmp_path, capsys):
    log_file = tmp_path / "job.log"
    noisy = logging.getLogger("ray.data")
    noisy.addHandler(logging.StreamHandler())  # what Ray Data sets up for itself
    noisy.setLevel(logging.INFO)
    try:
        assert route_third_party_logs(log_file)
        noisy.info("Running Dataset: progress dump")
        logging.getLogger("transformers").warning("a known-harmless warning")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library's UserWarning")
        logging.getLogger("ray").error("a real failure")
        for handler in logging.getLogger("ray").handlers:
            handler.flush()
        captured = capsys.readouterr()
        text = log_file.read_text()
        assert "progress dump" in text and "known-harmless" in text and "UserWarning" in text
        assert "progress dump" not in captured.out + captured.err
        assert "known-harmless" not in captured.out + captured.err
        assert "a real failure" in captured.err
    finally:
        logging.captureWarnings(False)
        for name in ("ray", "ray.data", "transformers", "py.warnings"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
        noisy.setLevel(logging.NOTSET)
