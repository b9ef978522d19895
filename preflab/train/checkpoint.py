"""Checkpoints with resume: weights, optimizer and scheduler state, RNG states, a JSON state.

Layout of one checkpoint (``run_dir/ckpt/step_000500/``)::

    <name>.safetensors      one per module (tied weights handled by safetensors.torch.save_model)
    <name>.optim.pt         one per optimizer (torch.save of its state_dict)
    <name>.sched.pt         one per scheduler
    <name>.gen.pt           one per extra torch.Generator (e.g. the sampler's)
    rng.pt                  python / numpy / torch (and CUDA) global RNG states
    state.json              the trainer's own state (step, counters, ...); written last

A checkpoint is written to a temporary sibling directory and renamed into place, so a
job killed mid-save leaves either the previous checkpoint set or the complete new one;
``latest_checkpoint`` only ever returns complete directories.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from preflab.config import ConfigError

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_names(kind: str, names) -> None:
    for name in names:
        if not _NAME.match(name) or name in ("rng", "state"):
            raise ValueError(f"save_checkpoint: {kind} name {name!r} must match [A-Za-z0-9_.-]+ "
                             "and not be 'rng' or 'state'")


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(s: dict[str, Any]) -> None:
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``run_dir/ckpt/step_{step:06d}/`` atomically and return its path.

    ``state`` must be JSON-serialisable; ``step`` is added to it. ``keep_last`` (if set)
    deletes all but the newest ``keep_last`` complete checkpoints afterwards.
    """
    schedulers = schedulers or {}
    generators = generators or {}
    state = dict(state or {})
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    for kind, d in (("module", modules), ("optimizer", optimizers), ("scheduler", schedulers),
                    ("generator", generators)):
        _check_names(kind, d)
    state.setdefault("step", step)
    try:
        state_text = json.dumps(state, indent=2, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"save_checkpoint: state is not JSON-serialisable: {e}") from None

    ckpt_root = Path(run_dir) / "ckpt"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".tmp_step_{step:06d}_{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"))
        for name, opt in optimizers.items():
            torch.save(opt.state_dict(), tmp / f"{name}.optim.pt")
        for name, sched in schedulers.items():
            torch.save(sched.state_dict(), tmp / f"{name}.sched.pt")
        for name, gen in generators.items():
            torch.save(gen.get_state(), tmp / f"{name}.gen.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(state_text + "\n")
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old one
            old = ckpt_root / f".old_{final.name}_{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``run_dir/ckpt``, oldest first."""
    root = Path(run_dir) / "ckpt"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def refuse_to_overwrite(run_dir: str | Path, *, resume: bool) -> None:
    """A new run (``resume`` false) into a directory that already holds one would train from
    scratch over its checkpoints, metrics and model: a ``ConfigError`` that names the directory,
    before anything is written. ``resume`` continues (or, with more steps, extends) that run."""
    run_dir = Path(run_dir)
    if resume:
        return
    last = latest_checkpoint(run_dir)
    held = f"checkpoint step {checkpoint_step(last)}" if last else (
        "metrics.jsonl" if (run_dir / "metrics.jsonl").is_file() else None)
    if held:
        raise ConfigError(f"{run_dir}: already holds a run ({held}); continue it with --resume (resume=True), or "
                          "train into another --out")


def write_step_eval(run_dir: str | Path, step: int, result: dict[str, Any]) -> Path:
    """An evaluation hook's numbers at ``step``: ``run_dir/eval/step_NNNNNN.json`` (``preflab checkpoints``)."""
    out = Path(run_dir) / "eval" / f"step_{step:06d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"step": step, **result}, indent=2, default=float) + "\n")
    return out


def fingerprint(rows: Any) -> str:
    """SHA-256 (first 16 hex digits) of training data: dataclasses, dicts or strings, in order."""
    import dataclasses
    import hashlib

    h = hashlib.sha256()
    for r in rows:
        obj = dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def check_inputs(run_dir: str | Path, inputs: dict[str, Any], *, resuming: bool, write: bool = True) -> None:
    """What a run trains on beyond its config (data fingerprints, the models it started from): a
    fresh run writes them to ``run_dir/inputs.json``; a resumed one must match them, else a
    ``ConfigError`` names the input, before anything is written (``config.check_resume`` does the
    same for the config). An input the file does not hold yet (an older run) is added."""
    path = Path(run_dir) / "inputs.json"
    old = json.loads(path.read_text()) if resuming and path.is_file() else {}
    for k, v in inputs.items():
        if k in old and old[k] != v:
            raise ConfigError(f"{k}: {v!r} differs from {old[k]!r}, which {run_dir} started with ({path}); a "
                              "resumed run must train on the same inputs (train into another --out for new ones)")
    if write:  # (the main process only, under DDP; atomically, as other processes may be reading it)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".inputs.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps({**old, **inputs}, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def load_checkpoint(
    path: str | Path,
    *,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore weights, optimizer/scheduler/generator state and RNG from ``path``; return its state."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no state.json)")
    wanted = [(f"{n}.safetensors", "module") for n in modules] + \
             [(f"{n}.optim.pt", "optimizer") for n in optimizers] + \
             [(f"{n}.sched.pt", "scheduler") for n in (schedulers or {})] + \
             [(f"{n}.gen.pt", "generator") for n in (generators or {})]
    for fname, kind in wanted:
        if not (path / fname).is_file():
            raise FileNotFoundError(f"{path / fname}: the checkpoint holds no {kind} of that name")
    for name, module in modules.items():
        missing, unexpected = load_model(module, str(path / f"{name}.safetensors"), strict=False)
        if unexpected or missing:
            raise RuntimeError(f"{path / (name + '.safetensors')}: weights do not match the module "
                               f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    for name, opt in optimizers.items():
        opt.load_state_dict(torch.load(path / f"{name}.optim.pt", weights_only=True))
    for name, sched in (schedulers or {}).items():
        sched.load_state_dict(torch.load(path / f"{name}.sched.pt", weights_only=True))
    for name, gen in (generators or {}).items():
        gen.set_state(torch.load(path / f"{name}.gen.pt", weights_only=True))
    if restore_rng:
        _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


def truncate_jsonl(path: Path, last_step: int) -> list[dict]:
    """Keep the lines of ``path`` with ``step <= last_step`` (a resumed run rewrites what follows)."""
    if not path.exists():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in kept if r.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


# module file of each trainer's checkpoint -> (key prefix of the model's weights, model kind)
EXPORTABLE = {"actor_critic": ("policy.", "policy"),  # PPO: the policy beside its critic
              "policy": ("", "policy"),  # DPO, SFT
              "model": ("", "reward model")}  # reward model


def checkpoint_step(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    if not m:
        raise ValueError(f"{path}: not a checkpoint directory (ckpt/step_NNNNNN)")
    return int(m.group(1))


def export_checkpoint(ckpt: str | Path, like: str | Path, out: str | Path) -> Path:
    """Write the model of checkpoint ``ckpt`` as a Hugging Face model directory ``out`` (weights,
    config, tokenizer), so that ``ab create``, ``gates``, ``rm score`` and ``ppo`` take it like
    any final model. ``like`` is a model directory of the same architecture and tokenizer: the
    run's own final ``policy/`` or ``model/``, or the model it started from. Nothing is written
    unless the weights match ``like``'s architecture exactly (tied weights aside)."""
    from safetensors.torch import load_file

    from preflab.models.hf import load_policy, load_reward_model, model_meta, write_model_meta

    ckpt, out = Path(ckpt), Path(out)
    if not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"{ckpt}: not a complete checkpoint (no state.json)")
    found = [n for n in EXPORTABLE if (ckpt / f"{n}.safetensors").is_file()]
    if not found:
        raise FileNotFoundError(f"{ckpt}: no model weights ({', '.join(f'{n}.safetensors' for n in EXPORTABLE)})")
    prefix, kind = EXPORTABLE[found[0]]
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty (choose a new --out)")
    model, tok = (load_policy if kind == "policy" else load_reward_model)(like)
    weights = {k[len(prefix):]: v for k, v in load_file(str(ckpt / f"{found[0]}.safetensors")).items()
               if k.startswith(prefix)}
    by_storage: dict[int, list[str]] = {}
    for k, v in model.state_dict().items():
        by_storage.setdefault(v.data_ptr(), []).append(k)
    tied = {k for keys in by_storage.values() if len(keys) > 1 for k in keys}  # e.g. lm_head = embeddings
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shapes differ
        raise ValueError(f"{like}: not the architecture of {ckpt} ({str(e).splitlines()[-1].strip()})") from None
    if unexpected or set(missing) - tied:
        raise ValueError(f"{like}: not the architecture of {ckpt} (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}); give the model the run started from")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if kind == "reward model":  # how it reads its input: the run's settings (like's file may be another run's)
        run_cfg = ckpt.parent.parent / "config.json"
        cfg = json.loads(run_cfg.read_text()) if run_cfg.is_file() else model_meta(like)
        meta = {k: cfg[k] for k in ("prompt_format", "max_length") if k in cfg}
        if meta:
            write_model_meta(out, {"kind": "reward_model", **meta})
    (out / "exported_from.json").write_text(json.dumps(
        {"checkpoint": str(ckpt.resolve()), "step": checkpoint_step(ckpt), "kind": kind,
         "architecture_from": str(Path(like).resolve())}, indent=2) + "\n")
    return out
