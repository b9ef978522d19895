"""The ``Accelerator`` of a training run, and the launch mistakes that would train silently wrong.

- Under ``accelerate launch --num_processes N`` on a machine without a GPU, an ``Accelerator()``
  that is not told ``cpu=True`` reports one process, and N independent copies of the run write
  into one directory (every metrics row N times) and exit 0. Here the CPU is chosen whenever the
  launcher started several processes and no GPU is present, and a run that still sees one
  process of several is refused.
- ``fp16`` autocast does nothing on a CPU (accelerate falls back to float32 without a word): it is
  refused there, naming the field (``bf16`` works on a CPU).
- The config's ``mixed_precision`` is what the trainers pass, so the launcher's
  ``--mixed_precision`` is overridden; a launcher setting that differs is pointed out.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from preflab.config import ConfigError


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when not launched)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def make_accelerator(cfg: Any, where: str):  # noqa: ANN201 - accelerate imported lazily
    """``Accelerator(cpu=..., mixed_precision=cfg.mixed_precision)`` for ``cfg`` (a trainer's config
    with ``mixed_precision`` and, where it has one, ``cpu``); ``where`` names the config in errors."""
    import torch
    from accelerate import Accelerator

    world = launched_processes()
    cpu = bool(getattr(cfg, "cpu", False)) or (world > 1 and not torch.cuda.is_available())
    if cfg.mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        raise ConfigError(f"{where}.mixed_precision: fp16 needs a GPU (on a CPU it would silently run float32); "
                          "use 'bf16' or 'no'")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher and launcher != cfg.mixed_precision:
        warnings.warn(f"{where}.mixed_precision: the run uses {cfg.mixed_precision!r} from its config, not the "
                      f"launcher's --mixed_precision {launcher!r} (set it in the config)", stacklevel=2)
    acc = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision)
    if world > 1 and acc.num_processes != world:
        raise ConfigError(f"{where}: launched as {world} processes but the run sees {acc.num_processes}; each would "
                          "train alone into the same directory (use the documented `accelerate launch` command)")
    return acc
