"""Knowledge or preference? Sample n answers per suite item and see whether any is right.

RLHF re-weights what a model can already say; it adds no knowledge. For each item of a
factual suite we sample ``n`` responses (default 16, temperature 1) and compare the
first sample's correctness with whether *any* of the n is right (pass@n):

- never right (0 of n): a **knowledge gap** — retrieval or new training data will fix it,
  preference optimisation will not;
- sometimes right (1..n-1 of n): a **preference problem** — the model can say it, and
  RLHF (or better decoding) can make it say it first;
- always right: fine.

With a per-item chance p of a right sample, "never right" in n samples has probability
(1-p)^n, so an item the model gets right 20% of the time is misfiled as a gap with
probability 0.8^16 = 2.8%; raise ``n_samples`` for rarer answers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from preflab.config import check, field_doc
from preflab.evaluate.factual import FactualConfig, SuiteItem, SuiteRun, run_suite

KINDS = ("knowledge_gap", "preference", "ok")


@dataclass
class DiagnoseConfig:
    """How ``preflab diagnose`` samples a checkpoint."""

    n_samples: int = field_doc(16, "Responses sampled per suite item.")
    temperature: float = field_doc(1.0, "Sampling temperature (must be > 0: greedy repeats itself).")
    max_new_tokens: int = field_doc(64, "Longest response generated per item.")
    batch_size: int = field_doc(64, "Prompts per generation batch.")
    seed: int = field_doc(0, "Seed of the sampler.")
    prompt_template: str = field_doc("User: {query}\nAssistant:", "Prompt around each query; {query} is replaced "
                                                                  "('chat': the tokenizer's chat template).")

    def validate(self) -> None:
        check(self.n_samples >= 2, "diagnose.n_samples", "must be >= 2")
        check(self.temperature > 0, "diagnose.temperature", "must be > 0")
        check(self.max_new_tokens >= 1, "diagnose.max_new_tokens", "must be >= 1")
        check(self.batch_size >= 1, "diagnose.batch_size", "must be >= 1")
        check("{query}" in self.prompt_template or self.prompt_template == "chat", "diagnose.prompt_template",
              "must contain {query} or be 'chat'")


@dataclass(frozen=True)
class ItemDiagnosis:
    id: str
    topic: str
    group: str | None
    n: int
    right: int  # samples right out of n
    first_right: bool
    kind: str  # knowledge_gap | preference | ok


@dataclass(frozen=True)
class GroupRow:
    """Items of one topic (or group): first-sample vs any-of-n accuracy and the split by kind."""

    name: str
    items: int
    first_sample_accuracy: float
    any_of_n_accuracy: float
    mean_sample_accuracy: float
    knowledge_gap: int
    preference: int
    ok: int


@dataclass(frozen=True)
class Diagnosis:
    n_samples: int
    items: list[ItemDiagnosis]
    by_topic: list[GroupRow]
    by_group: list[GroupRow]
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return {"n_samples": self.n_samples, "verdict": self.verdict, "items": [asdict(i) for i in self.items],
                "by_topic": [asdict(r) for r in self.by_topic], "by_group": [asdict(r) for r in self.by_group]}

    def kind_of(self, item_id: str) -> str:
        return next(i.kind for i in self.items if i.id == item_id)


def classify(right: int, n: int) -> str:
    """knowledge_gap if never right, ok if always right, else preference."""
    if right == 0:
        return "knowledge_gap"
    if right == n:
        return "ok"
    return "preference"


def _row(name: str, items: list[ItemDiagnosis]) -> GroupRow:
    return GroupRow(name=name, items=len(items),
                    first_sample_accuracy=float(np.mean([i.first_right for i in items])),
                    any_of_n_accuracy=float(np.mean([i.right > 0 for i in items])),
                    mean_sample_accuracy=float(np.mean([i.right / i.n for i in items])),
                    knowledge_gap=sum(i.kind == "knowledge_gap" for i in items),
                    preference=sum(i.kind == "preference" for i in items),
                    ok=sum(i.kind == "ok" for i in items))


def verdict_of(items: list[ItemDiagnosis]) -> str:
    """One line: how many items are gaps (and which groups are wholly gaps), how many preference."""
    gaps = [i for i in items if i.kind == "knowledge_gap"]
    pref = [i for i in items if i.kind == "preference"]
    groups: dict[str, list[ItemDiagnosis]] = {}
    for i in items:
        groups.setdefault(i.group or i.id, []).append(i)
    gap_groups = sorted(g for g, its in groups.items() if all(i.kind == "knowledge_gap" for i in its))
    n = len(items)
    line = (f"{len(gaps)}/{n} items never right in {items[0].n if items else 0} samples (knowledge gaps: "
            f"retrieval or new data, not RLHF)")
    if gap_groups:
        shown = ", ".join(gap_groups[:6]) + (" ..." if len(gap_groups) > 6 else "")
        line += f", wholly missing: {shown}"
    line += f"; {len(pref)}/{n} sometimes right (preference problems RLHF can fix)"
    line += f"; {n - len(gaps) - len(pref)}/{n} always right."
    return line


def diagnose_run(run: SuiteRun) -> Diagnosis:
    """Classify every item of a multi-sample suite run (pure: no model needed)."""
    n = run.correct.shape[1]
    if n < 2:
        raise ValueError("diagnose: needs at least 2 samples per item")
    items = [ItemDiagnosis(it.id, it.topic, it.group, n, int(run.correct[k].sum()), bool(run.correct[k, 0]),
                           classify(int(run.correct[k].sum()), n)) for k, it in enumerate(run.items)]
    topics = sorted({i.topic for i in items})
    groups = sorted({i.group for i in items if i.group})
    return Diagnosis(n_samples=n, items=items,
                     by_topic=[_row(t, [i for i in items if i.topic == t]) for t in topics],
                     by_group=[_row(g, [i for i in items if i.group == g]) for g in groups],
                     verdict=verdict_of(items))


def diagnose(model, tokenizer, items: list[SuiteItem], cfg: DiagnoseConfig | None = None, *,
             progress: bool = False) -> tuple[Diagnosis, SuiteRun]:
    """Sample ``cfg.n_samples`` answers per item from the checkpoint and classify each item."""
    cfg = cfg or DiagnoseConfig()
    fcfg = FactualConfig(n_samples=cfg.n_samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                         batch_size=cfg.batch_size, seed=cfg.seed, prompt_template=cfg.prompt_template)
    run = run_suite(model, tokenizer, items, fcfg, source="diagnose", progress=progress)
    return diagnose_run(run), run


def render_tables(d: Diagnosis, *, groups: bool = False):  # noqa: ANN201 - rich imported lazily
    """A rich table per topic (and optionally per group) of first-sample vs any-of-n accuracy."""
    from rich.table import Table

    rows = d.by_group if groups else d.by_topic
    t = Table(title=f"knowledge or preference? ({d.n_samples} samples per item)")
    for col in ("group" if groups else "topic", "items", "first sample right", f"any of {d.n_samples} right",
                "mean sample right", "knowledge gap", "preference", "ok"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.name, str(r.items), f"{r.first_sample_accuracy:.0%}", f"{r.any_of_n_accuracy:.0%}",
                  f"{r.mean_sample_accuracy:.0%}", str(r.knowledge_gap), str(r.preference), str(r.ok))
    return t
