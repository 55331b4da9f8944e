"""What a person reads while a job runs: a stage's progress, and third-party chatter kept off the screen.

On a terminal, progress is a tqdm bar and nothing else changes. Without one (a Ray job's log, CI, `| tee`),
carriage-return bars turn into walls of text, so a stage prints one line per interval instead (step,
share, rate, ETA, its own figures), and the libraries' INFO chatter, progress dumps and known-harmless
warnings (Ray Data's progress log, Ray's start-up and token-auth lines, weight-loading bars, DeepSpeed's
accelerator notice, Python warnings) go to a log file that the job names when it starts. Errors still
reach stderr.

Imports neither Ray nor torch: it configures their loggers by name, before or after they are imported.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

# Loggers whose records go to the job's log file instead of the console when there is no terminal.
THIRD_PARTY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "deepspeed", "DeepSpeed",
                       "transformers", "mlflow", "alembic", "urllib3", "filelock", "py.warnings", "torch",
                       "vllm", "accelerate")
_ROUTED = "_apr_ray_routed"
_log_file: Path | None = None  # where route_third_party_logs sent the records, for reroute()


def is_terminal() -> bool:
    return sys.stdout.isatty()


def route_third_party_logs(log_file: Path) -> bool:
    """Without a terminal, send the libraries' log records (and Python warnings) to `log_file`, errors also to
    stderr. Idempotent, and safe to call again after a library (re)configured its loggers. Returns whether
    anything was routed (False on a terminal)."""
    global _log_file
    if is_terminal():
        return False
    _log_file = log_file
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # Spawned processes (vLLM's engine, Ray's workers) read these before they import transformers.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    logging.captureWarnings(True)
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if getattr(handler, _ROUTED, False) or (isinstance(handler, logging.StreamHandler)
                                                    and not isinstance(handler, logging.FileHandler)):
                logger.removeHandler(handler)
        for handler in (to_file, errors):
            setattr(handler, _ROUTED, True)
            logger.addHandler(handler)
        logger.propagate = False
    return True


def reroute() -> None:
    """Route again after a library set up its own console handlers (Ray at `ray.init`, Ray Data at import)."""
    if _log_file is not None:
        route_third_party_logs(_log_file)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class StepProgress:
    """A stage's step counter: a tqdm bar on a terminal, else one line every `every` steps and at the last
    one: `sft: step 120/800 (15%), 2.21 step/s, 0:54 elapsed, ETA 5:08, loss 0.512`."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, initial: int = 0, every: int = 1,
                 unit: str = "step") -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, max(1, every)
        self.n, self.start_n, self.t0 = initial, initial, time.perf_counter()
        self.postfix: dict[str, str] = {}
        self.bar = None
        self.lines = enabled and not is_terminal()
        if enabled and is_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: str) -> None:
        self.n += n
        self.postfix = postfix
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix)
        elif self.lines and (self.n % self.every == 0 or self.n == self.total):
            print(self.line(), flush=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        parts = [f"{self.desc}: {self.unit} {self.n}/{self.total}{share}",
                 f"{rate:.2f} {self.unit}/s" if rate >= 0.1 else f"{1 / rate if rate else 0:.1f} s/{self.unit}",
                 f"{_duration(elapsed)} elapsed"]
        if rate > 0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
