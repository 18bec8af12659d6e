"""Run logging: Python logging per rank, a JSONL metrics file, optional TensorBoard, and the
rank-0 progress bar.

``metrics.jsonl`` holds one JSON object per log step (``step``, ``epoch``, ``lr``, each named
loss, ``loss`` (the weighted total), ``clips_per_s``, ``data_time``, ``skipped``...) and one
per evaluation (``{"step", "epoch", "eval/<metric>": ...}``), so a run can be plotted or
compared with nothing but ``json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int = 0, out_dir: str | os.PathLike | None = None,
                  level: int = logging.INFO) -> None:
    """Configure the ``leanvl`` logger: ``level`` on rank 0, WARNING elsewhere; rank 0 also
    appends to ``out_dir/train.log``. Calling it again replaces the handlers it added."""
    logger = logging.getLogger("leanvl")
    for handler in list(logger.handlers):
        if getattr(handler, "_leanvl_engine", False):
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(level if rank == 0 else logging.WARNING)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0 and out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(out_dir) / "train.log", encoding="utf-8"))
    for handler in handlers:
        handler._leanvl_engine = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(_RankFilter(rank))
        logger.addHandler(handler)
    logger.propagate = False


def _json_value(value: Any) -> Any:
    if hasattr(value, "item"):  # tensors / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl`` and, optionally, TensorBoard (rank 0 only:
    on other ranks every method is a no-op)."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True,
                 tensorboard: bool = False, filename: str = "metrics.jsonl"):
        self.enabled = enabled
        self.path = Path(out_dir) / filename
        self._tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
            except ImportError:
                log.warning("train.tensorboard=true but tensorboard is not installed "
                            "(pip install tensorboard); metrics go to %s only", self.path)

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written by a run that crashed after its checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        from leanvl.data.annotations import atomic_write_text

        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) > step:
                    continue
            except (ValueError, AttributeError):
                pass  # keep what we cannot parse; it is not ours to judge
            kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a JSON object per line, flushed at once)."""
        if not self.enabled:
            return
        clean = {key: _json_value(value) for key, value in record.items()}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self._tensorboard is not None:
            step = int(record.get("step", 0))
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


class ProgressBar:
    """A tqdm bar over optimizer steps on rank 0 (loss, clips/s, ETA); silent elsewhere."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                             leave=True, file=sys.stderr, smoothing=0.1)

    def advance(self, steps: int = 1) -> None:
        """Count ``steps`` finished optimizer steps."""
        if self._bar is not None:
            self._bar.update(steps)

    def set_total(self, total: int) -> None:
        """Change the number of steps the bar counts to (a run shortened to keep a deadline)."""
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def show(self, **postfix: Any) -> None:
        """Display the latest values (loss, throughput) beside the bar."""
        if self._bar is not None:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                   for k, v in postfix.items()})

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
