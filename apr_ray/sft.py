"""The SFT stage: optimizer steps over a stream of demonstration batches, with evaluation and checkpoints
at fixed intervals.

Owns the loop only. What it trains (a `learner.engine.Learner` in this process, or a Ray
`LearnerGroup`), where batches come from (the Parquet reader or a Ray Data stream), how evaluation runs
and where metrics go are handed in, so the same loop serves `apr-ray sft` on Ray and the plain script on
a GPU machine. Must not import Ray or MLflow.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from apr_ray.config import SFTConfig
from apr_ray.types import TrainSequence


class SFTLearner(Protocol):
    def sft_step(self, seqs: list[TrainSequence]) -> dict[str, float]: ...


MetricsSink = Callable[[dict[str, float], int], None]


@dataclass
class SFTResult:
    steps: int
    tokens: int  # trained (output) tokens
    wall_s: float
    train_s: float  # time inside learner steps
    eval_s: float
    last: dict[str, float] = field(default_factory=dict)  # the last step's metrics
    interrupted: bool = False


def epochs(make_epoch: Callable[[int], Iterator[list[TrainSequence]]]) -> Iterator[list[TrainSequence]]:
    """Batches forever: epoch 0, 1, ... from `make_epoch(epoch)` (which reshuffles by epoch). An epoch
    that yields nothing is an error, not an endless loop."""
    epoch = 0
    while True:
        empty = True
        for batch in make_epoch(epoch):
            empty = False
            yield batch
        if empty:
            raise ValueError("the demonstrations stream is empty: no SFT batch in a whole epoch")
        epoch += 1


@contextmanager
def stop_on_interrupt(stage: str) -> Iterator[Callable[[], bool]]:
    """While inside, the first Ctrl-C (SIGINT) only sets a flag that the loop reads between steps; a second
    one raises KeyboardInterrupt as usual. Yields the flag's reader.

    Why: a KeyboardInterrupt raised inside a step abandons the driver's wait while the learner (a Ray actor)
    finishes the update anyway, so the checkpoint written next would hold one step more than the loop
    counted. Off the main thread (or with SIGINT ignored, as under nohup) nothing is installed."""
    requested = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal requested
        if requested:
            raise KeyboardInterrupt
        requested = True
        print(f"\n{stage}: Ctrl-C: stopping after the current step (Ctrl-C again: at once)", file=sys.stderr,
              flush=True)

    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is signal.SIG_IGN:
        yield lambda: False
        return
    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: requested
    finally:
        signal.signal(signal.SIGINT, previous)


def run_sft(
    cfg: SFTConfig,
    learner: SFTLearner,
    batches: Iterator[list[TrainSequence]],
    *,
    log: MetricsSink,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    checkpoint: Callable[[int], Any] | None = None,
    progress: bool = True,
    start_step: int = 0,
) -> SFTResult:
    """Train `cfg.steps` steps. Metrics go to `log(metrics, step)` every `cfg.log_every` steps (prefix
    `sft/`), evaluation results every `cfg.eval_every` steps and at the end (`evaluate(step)` returns
    metrics, logged by the caller). Ctrl-C stops after the step in flight (see `stop_on_interrupt`): the
    steps since the last log are logged, the caller's `checkpoint` runs as at the end, and the result says
    `interrupted`."""
    from apr_ray.console import StepProgress

    t0 = time.perf_counter()
    result = SFTResult(steps=start_step, tokens=0, wall_s=0.0, train_s=0.0, eval_s=0.0)
    window: list[dict[str, float]] = []
    # A bar on a terminal; elsewhere about 20 lines a stage (never more often than the metrics are logged).
    bar = StepProgress(cfg.steps, "sft", enabled=progress, initial=start_step,
                       every=max(cfg.log_every, cfg.steps // 20))
    with stop_on_interrupt("sft") as stop_requested:
        try:
            for step in range(start_step + 1, cfg.steps + 1):
                if stop_requested():  # Ctrl-C came during the previous step's evaluation or checkpoint
                    result.interrupted = True
                    break
                batch = next(batches)
                t_step = time.perf_counter()
                metrics = learner.sft_step(batch)
                result.train_s += time.perf_counter() - t_step
                result.steps, result.tokens, result.last = step, result.tokens + int(metrics["tokens"]), metrics
                window.append(metrics)
                bar.update(1, loss=f"{metrics['loss']:.3f}")
                if step % cfg.log_every == 0 or step == cfg.steps:
                    log(_window_metrics(window, time.perf_counter() - t0, result), step)
                    window = []
                if stop_requested():  # no periodic evaluation or checkpoint: the final checkpoint follows
                    result.interrupted = True
                    break
                if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                    result.eval_s += _timed(evaluate, step)
                if checkpoint is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint(step)
                if cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * cfg.max_minutes:
                    print(f"sft: stopping at step {step}: sft.max_minutes={cfg.max_minutes} reached")
                    break
        except KeyboardInterrupt:  # the second Ctrl-C: the step in flight is abandoned
            result.interrupted = True
        finally:
            bar.close()
        if window:  # steps since the last log (a stop before the end)
            log(_window_metrics(window, time.perf_counter() - t0, result), result.steps)
        if evaluate is not None and not result.interrupted and result.steps > start_step:
            result.eval_s += _timed(evaluate, result.steps)
        if checkpoint is not None and result.steps > start_step:
            checkpoint(result.steps)
    result.wall_s = time.perf_counter() - t0
    return result


def _timed(fn: Callable[[int], Any], step: int) -> float:
    start = time.perf_counter()
    fn(step)
    return time.perf_counter() - start


def _window_metrics(window: list[dict[str, float]], elapsed: float, result: SFTResult) -> dict[str, float]:
    """Means over the steps since the last log; throughput over those steps' learner time."""
    n = len(window)
    tokens = sum(m["seq_tokens"] for m in window)  # forward tokens, prompts included, as the learner counts
    seconds = sum(m.get("step_s", 0.0) for m in window)
    out = {f"sft/{k}": sum(m[k] for m in window) / n for k in ("loss", "grad_norm", "lr") if k in window[0]}
    out["sft/tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
    out["sft/tokens_trained"] = float(result.tokens)
    out["sft/elapsed_s"] = elapsed
    return out
