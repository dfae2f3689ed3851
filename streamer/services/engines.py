"""Opening an engine for a model argument, as the commands and the Python API do: `auto` mode
picks `all` for a converted, calibrated model (calibrating the default model on first use) and
`dense` otherwise."""

from __future__ import annotations

import fcntl
import logging
import subprocess
import sys
from dataclasses import dataclass

import torch

from streamer.calibrate import CalibrationSettings, ranker_fits
from streamer.cpus import DEFAULT_CONCURRENCY
from streamer.engine import Engine, dense_engine, load_engine
from streamer.errors import ModelFormatError
from streamer.layout import ConvertedModel
from streamer.predictor import selection_file
from streamer.quant import RESIDENT_KINDS
from streamer.sources import Source
from streamer.window import READ_GAP

log = logging.getLogger("streamer")


@dataclass
class EngineOptions:
    mode: str = "auto"
    window: int = 4
    dram_budget: str | int | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    direct: bool = True
    dtype: str | None = None
    quant_resident: str | None = "auto"
    progress: bool = False  # a bar on stderr while the weights load
    read_gap: int = READ_GAP


def calibrate_default(source: ConvertedModel) -> bool:
    """The default model's first flash run calibrates its ranker, once (about 20 s here;
    README); False where the ranker does not fit the model."""
    settings = CalibrationSettings()
    if not ranker_fits(settings, source.config):
        return False
    with (source.directory.parent / f".{source.directory.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if selection_file(source.directory) is None:  # another process may have done it
            log.warning(
                "calibrating the default model's ranker (once; `streamer calibrate default` "
                "redoes it)"
            )
            # in a child process: what calibration allocates is not left in this process's
            # RSS, which the memory plan counts as fixed overhead
            cmd = [sys.executable, "-m", "streamer", "calibrate", str(source.directory)]
            if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
                raise ModelFormatError(
                    f"calibrating {source.directory} failed (its error is above): run "
                    "`streamer calibrate default` to see it again"
                )
    return True


def open_model_engine(model: str, source: Source, options: EngineOptions, max_len: int) -> Engine:
    """The engine of `source` (opened from `model`, "default" or a path); `auto` mode picks all
    or dense."""
    mode = options.mode
    converted = isinstance(source, ConvertedModel)
    if mode == "auto":
        calibrated = converted and selection_file(source.directory) is not None
        if converted and not calibrated and model == "default":
            calibrated = calibrate_default(source)
        mode = "all" if calibrated else "dense"
        if not calibrated:
            why = "not calibrated: run `streamer calibrate`" if converted else "not converted"
            log.info("mode dense (the model is %s for the flash modes)", why)
    if mode == "dense" and not converted:
        dtype = getattr(torch, options.dtype) if options.dtype else torch.float32
        q = options.quant_resident if options.quant_resident in RESIDENT_KINDS else None
        return dense_engine(source, dtype, max_len, quant_resident=q, progress=options.progress)
    if not converted:
        raise ModelFormatError(
            f"mode {mode} streams from the flash layout: run `streamer "
            f"convert {model} OUT` and pass OUT"
        )
    engine = load_engine(
        source.directory,
        mode=mode,
        window=options.window,
        dram_budget=options.dram_budget,
        concurrency=options.concurrency,
        direct=options.direct,
        dtype=options.dtype,
        max_len=max_len,
        quant_resident=options.quant_resident,
        progress=options.progress,
        read_gap=options.read_gap,
    )
    if engine.mode != "dense" or options.dram_budget:
        log.info("mode %s: %s", engine.mode, engine.plan.describe())
    return engine
