"""Optional experiment tracking: ``logger=none`` (default) or ``logger=wandb``.

A run logger sees the run's config when the run starts, each training epoch (every ``fit`` call:
the main model, surrogates, defense stages) and the final row (metrics, stage times, status).
The row files stay the source of truth; a tracker is a view of them. ``wandb`` is imported only
for ``logger=wandb``; by default it runs offline (``wandb sync <dir>`` uploads later).

Epochs are read from the ``bench`` log records ``bench.train.fit`` emits (``<desc> epoch i/n loss
.. acc .. lr ..``), so they reach the tracker only when INFO records are on (the CLI sets that).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from bench.errors import BenchError

log = logging.getLogger("bench")
EPOCH_MSG = "%s epoch %d/%d loss %.4f acc %.4f lr %.4g"  # the format string of bench.train.fit
SUMMARY_KEYS = ("ba", "ba_nt", "asr", "ra", "iso_precision", "iso_recall", "n_suspects",
                "n_poisoned", "wall_s", "peak_mem_mb", "status", "error", "run_id", "config_hash")


@dataclass(frozen=True)
class LoggerCfg:
    """Args:
    name: ``none`` or ``wandb``.
    project, entity, group, tags: wandb run placement (entity None: your default).
    mode: wandb mode: ``offline`` (default, no network), ``online`` or ``disabled``.
    dir: folder for wandb's files (default ``<results_dir>/wandb``).
    """

    name: str = "none"
    project: str = "backdoor-bench"
    entity: str | None = None
    group: str | None = None
    tags: list = field(default_factory=list)
    mode: str = "offline"
    dir: str | None = None


class RunLogger:
    """The interface, and the ``none`` logger: every method is a no-op."""

    def start(self, run_id: str, config: dict) -> None:
        """A run begins; ``config`` is the plain dict of its ``RunConfig``."""

    def log_epoch(self, desc: str, stats: dict) -> None:
        """One epoch of ``fit(desc=...)`` ended: ``stats`` has epoch, epochs, loss, acc, lr."""

    def finish(self, row: dict) -> None:
        """The run ended (``ok`` or ``failed``) with this row."""


class WandbLogger(RunLogger):
    def __init__(self, cfg: LoggerCfg, results_dir: str) -> None:
        try:
            import wandb
        except ImportError as e:
            raise BenchError("logger=wandb needs wandb: pip install wandb "
                             "(or pip install -e '.[wandb]')") from e
        self.wandb, self.cfg, self.run = wandb, cfg, None
        self.dir = cfg.dir or f"{results_dir}/wandb"

    def start(self, run_id: str, config: dict) -> None:
        from pathlib import Path

        Path(self.dir).mkdir(parents=True, exist_ok=True)
        c = self.cfg
        self.run = self.wandb.init(project=c.project, entity=c.entity, group=c.group,
                                   tags=list(c.tags) or None, mode=c.mode, dir=self.dir,
                                   name=run_id, config=config)

    def log_epoch(self, desc: str, stats: dict) -> None:
        if self.run is not None:
            key = desc.replace(" ", "/")
            self.run.log({f"{key}/{k}": v for k, v in stats.items()})

    def finish(self, row: dict) -> None:
        if self.run is None:
            return
        stages = row.get("stage_s") or {}
        self.run.log({f"stage_s/{k}": v for k, v in stages.items()})
        for k in SUMMARY_KEYS:
            v = row.get(k)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                self.run.summary[k] = v
        self.run.finish(exit_code=0 if row.get("status") == "ok" else 1)
        self.run = None


def make_logger(cfg: LoggerCfg, results_dir: str) -> RunLogger:
    """The logger ``cfg.name`` names; ``BenchError`` (one line) for an unknown name or a missing
    wandb."""
    if cfg.name == "none":
        return RunLogger()
    if cfg.name == "wandb":
        return WandbLogger(cfg, results_dir)
    raise BenchError(f"unknown logger '{cfg.name}'; known: none, wandb")


class EpochHandler(logging.Handler):
    """Forwards ``bench.train.fit``'s per-epoch log records to ``logger.log_epoch``."""

    def __init__(self, logger: RunLogger) -> None:
        super().__init__(logging.INFO)
        self.logger, self.dead = logger, False

    def emit(self, record: logging.LogRecord) -> None:
        if self.dead or record.msg != EPOCH_MSG or not isinstance(record.args, tuple) or \
                len(record.args) != 6:
            return
        desc, epoch, epochs, loss, acc, lr = record.args
        try:
            self.logger.log_epoch(str(desc), {"epoch": epoch, "epochs": epochs, "loss": loss,
                                              "acc": acc, "lr": lr})
        except Exception as e:  # noqa: BLE001 — tracking never fails a run
            self.dead = True
            log.warning("logger failed on an epoch (%s: %s); no more epochs are logged",
                        type(e).__name__, e)


class tracked:
    """Tracks one run: ``with t: row = run(cfg)`` starts the logger and forwards epochs while
    the block runs; ``t.finish(row)`` (after the row is written) ends it. A tracker that fails
    is a warning and is dropped, never a failed run."""

    def __init__(self, logger: RunLogger, run_id: str, config: dict) -> None:
        self.logger, self.run_id, self.config = logger, run_id, config
        self.handler = EpochHandler(logger)

    def _warn(self, what: str, e: Exception) -> None:
        log.warning("logger failed to %s (%s: %s); the run goes on untracked", what,
                    type(e).__name__, e)
        self.logger = self.handler.logger = RunLogger()

    def __enter__(self) -> tracked:
        try:
            self.logger.start(self.run_id, self.config)
        except Exception as e:  # noqa: BLE001 — tracking never fails a run
            self._warn("start", e)
        log.addHandler(self.handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        log.removeHandler(self.handler)

    def finish(self, row: dict) -> None:
        try:
            self.logger.finish(row)
        except Exception as e:  # noqa: BLE001
            self._warn("finish", e)
