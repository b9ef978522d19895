"""The stages of a project, in order, resumable stage by stage.

A stage is a function that reads the store and earlier stages' directories and writes its
own directory under the run dir. ``StageRunner`` records each finished stage (with its
wall time and a small JSON summary) in ``RUN/stages.json``; running again skips what is done,
so an interrupted run continues where it stopped. The sandbox demo (``demo.py``) is this
pipeline with simulated raters and production in place of people.

Here are the pieces that do not depend on who the raters are: the stage runner, reward-model
training + held-out evaluation in the report's shape, a PPO reward function from a trained
reward model, run lineage, the evidence + gates of a checkpoint, and a real project's report
inputs from its store. The demo calls them in order; on a real project the CLI commands call
them one step at a time (docs/own_project.md): there is no single ``preflab run`` that waits
for people.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

PROMPT_TEMPLATE = "User: {query}\nAssistant:"


def format_prompt(query: str) -> str:
    return PROMPT_TEMPLATE.format(query=query)


def query_of(prompt: str) -> str:
    """The raw query inside a ``PROMPT_TEMPLATE`` prompt (the reward model formats it itself)."""
    head, tail = PROMPT_TEMPLATE.split("{query}")
    if prompt.startswith(head) and prompt.endswith(tail):
        return prompt[len(head): len(prompt) - len(tail)]
    return prompt


# ---- resumable stages -------------------------------------------------------------------------


class StageRunner:
    """Runs named stages once each; ``RUN/stages.json`` remembers the finished ones. A stage named
    in ``refresh`` (one that reads what every earlier stage wrote, like a summary) runs again when
    an earlier stage ran in this invocation, so it never describes a run without that stage."""

    def __init__(self, run_dir: str | Path, console: Console | None = None, *, refresh: Iterable[str] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "stages.json"
        self.console = console or Console()
        self.done: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.refresh = set(refresh)
        self.ran: list[str] = []  # stages run (not skipped) in this invocation

    def run(self, name: str, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        if name in self.done and not (name in self.refresh and self.ran):
            self.console.print(f"[dim]= {name}: done earlier ({self.done[name]['seconds']:.0f} s), skipped[/dim]")
            return self.done[name].get("out", {})
        if self.done.pop(name, None) is not None:  # a refreshed stage: not counted as done while it runs
            self.console.print(f"[dim]= {name}: done earlier; runs again after {', '.join(self.ran)}[/dim]")
        self.console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        out = fn() or {}
        secs = time.perf_counter() - t0
        self.done[name] = {"seconds": round(secs, 2), "out": out}
        self.ran.append(name)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=2, default=str) + "\n")
        tmp.replace(self.path)
        summary = ", ".join(f"{k}={_short(v)}" for k, v in out.items() if not isinstance(v, (dict, list)))
        self.console.print(f"[green]✓ {name}[/green] in {secs:.0f} s" + (f": {summary}" if summary else ""))
        return out

    def seconds(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self.done.items()}


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path


# ---- reward model -----------------------------------------------------------------------------


def rm_eval_json(report, ceiling: float | None) -> dict[str, Any]:
    """A ``PreferenceReport`` in the report's ``rm*/eval.json`` shape."""
    a = report.accuracy
    return {
        "n": report.n_pairs, "accuracy": a.value, "ci": [a.low, a.high], "ceiling": ceiling, "ece": report.ece,
        "by_strength": [{"strength": int(k), "accuracy": v.value, "ci": [v.low, v.high], "n": v.n}
                        for k, v in sorted(report.per_strength.items(), key=lambda kv: int(kv[0]))],
        "by_topic": [{"topic": k, "accuracy": v.value, "ci": [v.low, v.high], "n": v.n}
                     for k, v in report.per_topic.items()],
        "by_rater": [{"rater": k, "accuracy": v.value, "ci": [v.low, v.high], "n": v.n}
                     for k, v in report.per_rater.items()],
        "strength_monotonic": report.strength_monotonic, "length_corr": report.length_corr,
        "warnings": list(report.warnings),
    }


def train_reward_stage(*, examples: Sequence, policy_dir: str | Path, run_dir: str | Path, cfg,
                       ceiling: float | None, reference: Callable[[Any], bool | None] | None = None,
                       resume: bool = True) -> dict[str, Any]:
    """Split by prompt, train the reward model from the policy's weights, evaluate held out.

    Writes ``run_dir/model`` (HF dir), ``run_dir/eval.json`` (report shape) and the full
    ``run_dir/eval/preference.json``. ``reference(example)`` (optional, e.g. the sandbox
    gold) adds an outside-judge accuracy to the full report only.
    """
    from preflab.evaluate.preference import preference_report
    from preflab.train.data import examples_from_rows, split_by_prompt
    from preflab.train.reward import initial_reward_model, score_pairs, train_reward

    run_dir = Path(run_dir)
    ex = examples_from_rows(examples)
    train, val = split_by_prompt(ex, val_fraction=cfg.val_fraction, seed=cfg.seed)
    model, tok = initial_reward_model(policy_dir, seed=cfg.seed)
    result = train_reward(cfg, model=model, tokenizer=tok, train=train, val=val, run_dir=run_dir, resume=resume)
    rc, rr = score_pairs(model, tok, val, max_length=cfg.max_length, prompt_format=cfg.prompt_format)
    ref = [reference(e) for e in val] if reference is not None else None
    report = preference_report(val, rc, rr, ceiling=ceiling, reference=ref, seed=cfg.seed)
    write_json(run_dir / "eval" / "preference.json", report.to_dict())
    ev = rm_eval_json(report, ceiling)
    write_json(run_dir / "eval.json", ev)
    return {"model_dir": str(result.model_dir), "n_train": len(train), "n_val": len(val),
            "accuracy": ev["accuracy"], "ci": ev["ci"], "ceiling": ceiling, "warnings": ev["warnings"]}


def trained_prompt_format(rm_dir: str | Path) -> str:
    """The prompt format a reward model was trained with: its directory's ``preflab.json`` (written
    by ``rm train`` and kept by an export or a copy of the directory), else its ``rm train`` run's
    ``config.json`` beside ``model/`` (runs from before the file); "dialogue" when there is neither."""
    from preflab.models.hf import model_meta
    from preflab.train.data import PROMPT_FORMATS

    for meta in (model_meta(rm_dir), _run_config(rm_dir)):
        if meta.get("prompt_format") in PROMPT_FORMATS:
            return meta["prompt_format"]
    return "dialogue"


def trained_max_length(rm_dir: str | Path) -> int:
    """The longest prompt + response (tokens) a reward model was trained on (``preflab.json``, or its
    run's ``config.json``); 256, the trainer's default, when neither says."""
    from preflab.models.hf import model_meta

    for meta in (model_meta(rm_dir), _run_config(rm_dir)):
        if isinstance(meta.get("max_length"), int) and meta["max_length"] > 0:
            return meta["max_length"]
    return 256


def _run_config(rm_dir: str | Path) -> dict[str, Any]:
    try:
        cfg = json.loads((Path(rm_dir).parent / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def reward_fn_from(rm_dir: str | Path, *, batch_size: int = 64, max_length: int | None = None,
                   to_query: Callable[[str], str] = query_of):
    """``(prompts, texts) -> (B,) tensor`` scoring with a trained reward model (for PPO).

    ``to_query`` recovers the raw query from the policy's prompt (default: strip the dialogue
    template); the reward model then wraps it in the prompt format it was trained with, and cuts
    at the length it was trained with unless ``max_length`` says otherwise (``trained_prompt_format``,
    ``trained_max_length``).
    """
    import torch

    from preflab.models.hf import fuse_gelu, load_reward_model
    from preflab.train.reward import score_responses

    model, tok = load_reward_model(rm_dir)
    fuse_gelu(model)
    model.eval()
    fmt = trained_prompt_format(rm_dir)
    max_length = max_length or trained_max_length(rm_dir)

    def reward_fn(prompts: list[str], texts: list[str]) -> torch.Tensor:
        scores = score_responses(model, tok, [to_query(p) for p in prompts], texts, batch_size=batch_size,
                                 max_length=max_length, prompt_format=fmt)
        return torch.tensor(scores, dtype=torch.float32)

    return reward_fn


def sample_eval_hook(tokenizer, prompts: Sequence[str], *, max_new_tokens: int, ref=None,  # noqa: ANN001
                     reward_fn: Callable | None = None, seed: int = 0) -> Callable[[int, Any], dict[str, float]]:
    """An ``eval_hook(step, policy) -> dict`` for ``train_ppo`` / ``train_dpo`` (the CLI's, where no
    factual suite is given): one sample per prompt (temperature 1, the same seed at every step) and

    - ``eval/reward``: the reward model's mean score of the samples (with ``reward_fn``);
    - ``eval/kl``: mean over samples of sum_t KL(pi(.|y_<t) || ref(.|y_<t)), the exact per-state KL
      over the vocabulary summed along each sampled response: an unbiased, never negative estimate
      of KL(pi || ref) per response in nats, steadier than the log-ratio of the sampled tokens (with
      ``ref``; the drift a DPO run has no other gauge of);
    - ``eval/<detector>``: the text detectors' rates (formality, hedging, confidence, repetition,
      length in words; ``evaluate.detectors.text_rates``).
    """
    import torch

    from preflab.evaluate.detectors import text_rates
    from preflab.losses.kl import kl_full
    from preflab.models.sampling import sample, sequence_log_softmax

    prompts = list(prompts)

    def hook(step: int, policy) -> dict[str, float]:  # noqa: ANN001
        s = sample(policy, tokenizer, prompts, max_new_tokens=max_new_tokens,
                   generator=torch.Generator().manual_seed(seed))
        out: dict[str, float] = {}
        if reward_fn is not None:
            out["eval/reward"] = float(reward_fn(prompts, s.texts).mean())
        if ref is not None:
            kls, was_training = [], policy.training
            policy.eval()  # no dropout in the measurement (sample() restores the mode it found, as here)
            with torch.no_grad():
                for i in range(0, len(prompts), 8):  # 8 rows at a time: B x R x vocab floats per model
                    rows = slice(i, i + 8)
                    ids, mask = s.input_ids[rows], s.attention_mask[rows]
                    per_state = kl_full(sequence_log_softmax(policy, ids, mask, s.prompt_len),
                                        sequence_log_softmax(ref, ids, mask, s.prompt_len))
                    kls.append((per_state * s.response_mask[rows].float()).sum(-1))
            policy.train(was_training)
            out["eval/kl"] = float(torch.cat(kls).mean())
        return {**out, **{f"eval/{k}": v for k, v in text_rates(s.texts).items()}}

    return hook


# ---- lineage ----------------------------------------------------------------------------------


def judgements_lineage(rows: Sequence) -> dict[str, Any]:
    """What a run trained on, from the store's ``ops.preference_examples`` rows: judgements, pairs,
    rounds and the guideline version of each judgement."""
    guidelines: dict[str, int] = {}
    for e in rows:
        guidelines[e.guideline_version or "none"] = guidelines.get(e.guideline_version or "none", 0) + 1
    return {"judgements": len(rows), "pairs": len({e.pair_id for e in rows}),
            "guidelines": dict(sorted(guidelines.items())), "rounds": len({e.round_id for e in rows})}


def record_run_lineage(engine, *, project: str, run: str, trained_on_judgements: bool = False,  # noqa: ANN001
                       round_kinds: Sequence[str] = ("calibration", "collection", "rerate"), **payload: Any) -> bool:
    """Store where ``run`` came from (``preflab lineage``), once: a resumed run does not record it
    twice (returns False then). ``trained_on_judgements`` adds ``judgements_lineage`` of the rows
    the trainers read (``ops.preference_examples`` of ``round_kinds`` rounds)."""
    from preflab.collect.rerate import lineage, record_lineage
    from preflab.store import db, ops

    with db.session_scope(engine) as s:
        pid = ops.require_project(s, name=project)
        if any(r["run"] == run for r in lineage(s, project_id=pid)):
            return False
        if trained_on_judgements:
            payload = {**judgements_lineage(ops.preference_examples(s, project_id=pid, round_kinds=tuple(round_kinds))),
                       **payload}
        record_lineage(s, project_id=pid, run=run, **payload)
    return True


# ---- gates --------------------------------------------------------------------------------------


@dataclass
class GateOutcome:
    passed: bool
    failed: list[str]
    report: dict[str, Any]


def gate_checkpoint(*, candidate_dir: str | Path, baseline_dir: str | Path, items, gates_cfg, ab=None,
                    out_dir: str | Path, evidence_cfg=None, subject: str = "") -> GateOutcome:
    """Collect the factual + detector evidence of a candidate against the baseline, add the A/B
    result if there is one, and evaluate the gates. Writes ``out_dir/gate.json``."""
    from preflab.evaluate.gates import collect_evidence, evaluate_gates
    from preflab.models.hf import load_policy

    cand, base = load_policy(candidate_dir), load_policy(baseline_dir)
    ev = collect_evidence(cand, base, items, reference=base, cfg=evidence_cfg, out_dir=out_dir)
    ev.ab = ab
    rep = evaluate_gates(gates_cfg, ev, subject=subject)
    rep.save(Path(out_dir) / "gate.json")
    return GateOutcome(rep.passed, rep.failed, rep.to_dict())


# ---- a real project's report inputs ----------------------------------------------------------

FROM_STORE = "preflab report --db"  # marks the files project_summaries writes; it never overwrites others
RATED_KINDS = ("calibration", "collection", "rerate")


def store_quality(session, *, project_id: int, round_kinds: Sequence[str] = ("collection",)) -> dict[str, Any]:
    """Planted-duplicate self-consistency per rater and pooled, and the accuracy ceiling it implies
    (``quality.consistency``; docs/quality.md): the core of ``collection/quality.json``.

    ``n_pairs`` counts the distinct pairs judged in ``round_kinds`` rounds, ``n_judgements`` their
    judgements plus every duplicate answer.
    """
    from preflab.quality.consistency import consistency_by_rater, self_consistency
    from preflab.store import ops

    dups = ops.duplicate_pairs(session, project_id=project_id)
    rows = [j for j in ops.project_judgements(session, project_id=project_id, round_kinds=list(round_kinds))
            if not j.is_duplicate]
    by_rater: dict[str, list] = {}
    for d in dups:
        by_rater.setdefault(d.rater_name, []).append((d.first, d.second))
    cons = consistency_by_rater(by_rater)
    pooled = self_consistency([p for v in by_rater.values() for p in v]) if dups else None
    return {
        "n_pairs": len({j.pair_id for j in rows}), "n_judgements": len(rows) + len(dups), "n_duplicates": len(dups),
        "ceiling": pooled.ceiling if pooled else None, "consistency": pooled.consistency if pooled else None,
        "ceiling_ci": [pooled.ceiling_low, pooled.ceiling_high] if pooled else None,
        "raters": [{"rater": r, "n_duplicates": c.n, "consistency": c.consistency, "ci": [c.low, c.high],
                    "flip_rate": c.flip_rate, "ceiling": c.ceiling} for r, c in sorted(cons.items())],
    }


def _evidence_files(run_dir: Path, name: str) -> list[Path]:
    """Every ``*/eval/NAME`` under ``run_dir`` outside training checkpoints (``ckpt/``)."""
    return sorted(p for p in run_dir.rglob(f"eval/{name}") if "ckpt" not in p.relative_to(run_dir).parts)


def checkpoint_row(evidence_dir: Path, *, run: str, step: int | None) -> dict[str, Any]:
    """A ``checkpoints.json`` row from the evidence ``preflab gates`` leaves in a directory
    (``gate.json``; ``ab.json`` and ``detectors.json`` when they are there)."""
    def read(name: str) -> Any:
        return json.loads((evidence_dir / name).read_text()) if (evidence_dir / name).is_file() else None

    gate, ab, det = read("gate.json"), read("ab.json"), read("detectors.json") or {}
    return {"run": run, "step": step,
            "win_rate": ab["overall"]["rate"] if ab else None,
            "win_rate_ci": [ab["overall"]["ci_low"], ab["overall"]["ci_high"]] if ab else None,
            **({"win_rate_n": ab["overall"]["n"]} if ab and "n" in ab["overall"] else {}),
            "detectors": {k: v.get("value") for k, v in det.items() if isinstance(v, dict)},
            "gates": [{"name": g["name"], "value": g["value"], "threshold": g["threshold"], "pass": g["passed"],
                       **({"rule": g["rule"]} if g.get("rule") else {})} for g in gate["gates"]],
            "promoted": gate["passed"], **({"stage": gate["stage"]} if gate.get("stage") else {})}


def _checkpoint_label(ckpt: Path, run_dir: Path) -> tuple[str, int | None]:
    """(the checkpoint dir relative to the run dir, its PPO/DPO step when it is a run's final ``policy/``)."""
    label = str(ckpt.relative_to(run_dir)) if ckpt.is_relative_to(run_dir) else str(ckpt)
    metrics = ckpt.parent / "metrics.jsonl"
    step = None
    if ckpt.name == "policy" and metrics.is_file():
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        step = json.loads(lines[-1]).get("step") if lines else None
    return label, step


def store_decisions(session, *, project_id: int, run_dir: Path) -> list[dict[str, Any]]:  # noqa: ANN001
    """The project's gate decisions (``preflab decisions``), oldest first, in ``decisions.json``'s shape:
    checkpoint (relative to ``run_dir`` when inside it, else the stored path), stage, promoted, failed
    gates, notes, time and event id."""
    from preflab.evaluate.promote import decisions

    run = run_dir.resolve()
    out = []
    for e in decisions(session, project_id=project_id):
        p = e.payload
        path = Path(e.subject)
        out.append({"event": e.id, "at": e.created_at.isoformat(timespec="minutes"),
                    "checkpoint": str(path.relative_to(run)) if path.is_relative_to(run) else e.subject,
                    "subject": e.subject, "stage": p.get("stage"), "promoted": bool(p.get("promoted")),
                    "failed": list(p.get("failed", [])), "notes": list(p.get("notes", []))})
    return out


def project_summaries(run_dir: str | Path, engine, *, project: str, cost=None) -> dict[str, str]:  # noqa: ANN001
    """Write a real project's report inputs into ``run_dir`` from the store and the checkpoints' evidence.

    - ``collection/quality.json``: ``store_quality`` over calibration, collection and re-rate rounds,
      with the project's open drift alerts;
    - ``cost.json``: annotator cost = time on task x each rater's hourly rate from the store
      (``cost.default_hourly_rate`` where none is set), no compute (``report.cost``); with
      ``outcomes/comparison.json`` (``preflab outcomes compare --run``) also the ROI: escalations
      avoided per week at ``cost.weekly_conversations`` x ``cost.cost_per_escalation``, and the payback;
    - ``checkpoints.json``: a row per ``*/eval/gate.json`` under ``run_dir`` (``preflab gates``), win
      rate from the ``ab.json`` beside it;
    - ``ab/result.json``, ``factual/result.json``: the newest ``*/eval/ab.json`` / ``factual_compare.json``;
    - ``decisions.json``: every promotion decision in the store (``evaluate.promote.decisions``, refusals
      included, oldest first), each with its notes (e.g. promoted under other gate settings than a refusal).

    The ledger warns of ``[cost] hourly_rates`` keys that name none of the project's raters.

    Each file carries ``"written_by": FROM_STORE``. An existing file without that mark (the demo's
    own summaries, a hand-written one) is kept. Returns ``{file: "written" | "kept: ..."}``.
    """
    from preflab.report.cost import CostConfig, build_ledger, judgement_times
    from preflab.store import db, ops

    run_dir = Path(run_dir)
    with db.session_scope(engine, readonly=True) as s:
        pid = ops.require_project(s, name=project)
        quality = store_quality(s, project_id=pid, round_kinds=RATED_KINDS)
        raters = ops.list_raters(s, project_id=pid)
        names = {r.id: r.name for r in raters}
        quality["drift_alerts"] = [
            {"rater": names.get(a.rater_id, ""), "at": a.created_at.isoformat(timespec="minutes"),
             "signal": a.message, "examples": list(a.payload.get("examples", []))}
            for a in ops.list_alerts(s, project_id=pid, resolved=False)]
        times = judgement_times(ops.project_judgements(s, project_id=pid, round_kinds=[*RATED_KINDS, "eval"]))
        decisions = store_decisions(s, project_id=pid, run_dir=run_dir)
    cost = cost or CostConfig()
    rates = {r.name: r.hourly_rate for r in raters if r.hourly_rate > 0}
    cfg = dataclasses.replace(cost, hourly_rates={**rates, **cost.hourly_rates})  # the config's rates win
    roi = {}
    comparison = run_dir / "outcomes" / "comparison.json"  # `preflab outcomes compare --run`: the ROI's rates
    if comparison.is_file() and (esc := json.loads(comparison.read_text()).get("escalation")):
        roi = {"escalation_before": esc["baseline"], "escalation_after": esc["candidate"],
               "escalation_diff_ci": tuple(esc["ci"])}
    files: dict[str, Any] = {"collection/quality.json": quality,
                             "cost.json": build_ledger(cfg, judgement_times=times, raters=[r.name for r in raters],
                                                       **roi)}
    if decisions:
        files["decisions.json"] = {"decisions": decisions}

    rows = []
    for gate_file in _evidence_files(run_dir, "gate.json"):
        label, step = _checkpoint_label(gate_file.parent.parent, run_dir)
        rows.append(checkpoint_row(gate_file.parent, run=label, step=step))
    if rows:
        files["checkpoints.json"] = {"rows": rows}
    for name, evidence in (("ab/result.json", "ab.json"), ("factual/result.json", "factual_compare.json")):
        newest = max(_evidence_files(run_dir, evidence), key=lambda p: p.stat().st_mtime, default=None)
        if newest is not None:
            label, _ = _checkpoint_label(newest.parent.parent, run_dir)
            files[name] = {**json.loads(newest.read_text()), "candidate": label}

    done = {}
    for name, obj in files.items():
        path = run_dir / name
        if path.is_file():
            try:
                mine = json.loads(path.read_text()).get("written_by") == FROM_STORE
            except (ValueError, AttributeError):
                mine = False
            if not mine:
                done[name] = f"kept: {name} was not written by {FROM_STORE}"
                continue
        write_json(path, {**obj, "written_by": FROM_STORE})
        done[name] = "written"
    return done
