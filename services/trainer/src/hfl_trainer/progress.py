"""What a person sees while a trainer trains.

At a terminal (stderr is a TTY): a bar per local epoch, redrawn in place, and
one line per round with loss, accuracy and throughput. Without a terminal
(a container, a file, CI): nothing is written directly; every round is one
structured log record through ``logging.getLogger(__name__)``, whose
``extra`` fields (``round``, ``loss``, ``accuracy``, ``examples_per_second``,
``num_examples``, ``steps``) a JSON formatter can emit as they are.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from hfl_trainer.training import TrainResult

logger = logging.getLogger(__name__)

_BAR_WIDTH = 30
# Redraw at most this often: a terminal write per step would slow small models.
_REDRAW_SECONDS = 0.1


@dataclass(frozen=True)
class BatchProgress:
    """Where local training stands after one batch (no tensor values: no device sync)."""

    epoch: int  # 0-based
    epochs: int
    step: int  # 1-based within the epoch
    steps_per_epoch: int
    examples_seen: int  # within the epoch


class ProgressReporter:
    """Renders :class:`BatchProgress` and round summaries; pass ``on_batch`` to the trainer.

    ``stream`` defaults to ``sys.stderr``; ``interactive`` defaults to whether
    that stream is a TTY.
    """

    def __init__(self, stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        if interactive is None:
            isatty = getattr(self._stream, "isatty", None)
            interactive = bool(isatty()) if callable(isatty) else False
        self._interactive = interactive
        self._last_draw = 0.0
        self._start = time.perf_counter()

    @property
    def interactive(self) -> bool:
        return self._interactive

    def on_batch(self, progress: BatchProgress) -> None:
        if not self._interactive:
            return
        now = time.perf_counter()
        if progress.step == 1:
            self._start = now
        last = progress.step >= progress.steps_per_epoch
        if not last and now - self._last_draw < _REDRAW_SECONDS:
            return
        self._last_draw = now
        fraction = progress.step / max(1, progress.steps_per_epoch)
        filled = round(fraction * _BAR_WIDTH)
        elapsed = max(now - self._start, 1e-9)
        rate = progress.examples_seen / elapsed
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        self._stream.write(
            f"\repoch {progress.epoch + 1}/{progress.epochs} [{bar}] "
            f"{progress.step}/{progress.steps_per_epoch} {rate:,.0f} ex/s"
        )
        if last:
            self._stream.write("\n")
        self._stream.flush()

    def round_finished(self, round_index: int, result: TrainResult) -> None:
        fields = {
            "round": round_index,
            "loss": result.loss,
            "accuracy": result.accuracy,
            "examples_per_second": result.examples_per_second,
            "num_examples": result.num_examples,
            "steps": result.steps,
        }
        if self._interactive:
            self._stream.write(
                f"round {round_index}: loss {result.loss:.4f}  accuracy {result.accuracy:.2%}  "
                f"{result.examples_per_second:,.0f} examples/s  ({result.num_examples} examples, "
                f"{result.steps} steps)\n"
            )
            self._stream.flush()
            logger.debug("round %d finished", round_index, extra=fields)
            return
        logger.info(
            "round %d finished: loss=%.4f accuracy=%.4f examples_per_second=%.1f",
            round_index,
            result.loss,
            result.accuracy,
            result.examples_per_second,
            extra=fields,
        )
