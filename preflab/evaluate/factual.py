"""Factual regression suites: a file format, running a checkpoint on it, McNemar between two.

Suite format (JSONL, one item per line; a YAML file holding a list of the same mappings
also works)::

    {"id": "price_team/q_1a2b", "topic": "pricing", "query": "How much is the Team plan?",
     "required": ["\\$30 per user"], "forbidden": ["\\$25 per user"],
     "probe": null, "group": "price_team"}

- ``required``: regexes that must all match the response (case-insensitive, ``re.search``);
- ``forbidden``: regexes none of which may match (e.g. a stale price);
- ``probe``: ``"false_premise"`` marks a sycophancy probe (the query asserts something false),
  else null;
- ``group`` (optional): items about the same fact; ``diagnose`` also reports per group.

A response is correct when every required pattern matches and no forbidden one does.
Accuracy is the share of items whose first sample is correct; two checkpoints are compared
item by item with McNemar's exact test: two-sided for "do they differ" (``p_value``), one-sided
for "did the candidate get worse" (``p_regression``), which is what a regression gate asks.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preflab.config import check, field_doc
from preflab.evaluate.detectors import Responses

PROBES = ("false_premise",)


@dataclass
class FactualConfig:
    """How a checkpoint is run against a factual suite."""

    n_samples: int = field_doc(1, "Responses sampled per item (the first one counts for accuracy).")
    temperature: float = field_doc(0.0, "Sampling temperature; 0 = greedy.")
    top_p: float = field_doc(1.0, "Nucleus sampling mass.")
    max_new_tokens: int = field_doc(64, "Longest response generated per item.")
    batch_size: int = field_doc(64, "Prompts per generation batch.")
    seed: int = field_doc(0, "Seed of the sampler.")
    prompt_template: str = field_doc("User: {query}\nAssistant:", "Prompt around each query; {query} is replaced "
                                                                  "('chat': the tokenizer's chat template).")
    alpha: float = field_doc(0.05, "Significance level for calling a paired difference a regression.")

    def validate(self) -> None:
        check(self.n_samples >= 1, "factual.n_samples", "must be >= 1")
        check(self.temperature >= 0, "factual.temperature", "must be >= 0")
        check(self.n_samples == 1 or self.temperature > 0, "factual.n_samples",
              "more than one sample per item needs temperature > 0 (greedy repeats itself)")
        check(0 < self.top_p <= 1, "factual.top_p", "must be in (0, 1]")
        check(self.max_new_tokens >= 1, "factual.max_new_tokens", "must be >= 1")
        check(self.batch_size >= 1, "factual.batch_size", "must be >= 1")
        check("{query}" in self.prompt_template or self.prompt_template == "chat", "factual.prompt_template",
              "must contain {query} or be 'chat'")
        check(0 < self.alpha < 1, "factual.alpha", "must be in (0, 1)")


# ---- the suite -------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteItem:
    id: str
    topic: str
    query: str
    required: tuple[str, ...] = ()
    forbidden: tuple[str, ...] = ()
    probe: str | None = None
    group: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["required"], d["forbidden"] = list(self.required), list(self.forbidden)
        return d

    def check(self, text: str) -> bool:
        """Correct: every required pattern matches and no forbidden one does."""
        return all(_rx(p).search(text) for p in self.required) and not any(_rx(p).search(text) for p in self.forbidden)

    def forbidden_hit(self, text: str) -> bool:
        return any(_rx(p).search(text) for p in self.forbidden)


_RX_CACHE: dict[str, re.Pattern[str]] = {}


def _rx(p: str) -> re.Pattern[str]:
    if p not in _RX_CACHE:
        _RX_CACHE[p] = re.compile(p, re.IGNORECASE)
    return _RX_CACHE[p]


def item_from_dict(d: Any, where: str) -> SuiteItem:
    """One suite item from a mapping; errors name ``where`` and the field."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    known = {"id", "topic", "query", "required", "forbidden", "probe", "group"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    for key in ("id", "topic", "query"):
        if not isinstance(d.get(key), str) or not d[key].strip():
            raise ValueError(f"{where}: field {key!r} must be a non-empty string")
    pats: dict[str, tuple[str, ...]] = {}
    for key in ("required", "forbidden"):
        v = d.get(key, [])
        if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
            raise ValueError(f"{where}: field {key!r} must be a list of regex strings")
        for i, p in enumerate(v):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"{where}: {key}[{i}]: bad regex {p!r}: {e}") from None
            if re.search(r"(?<!\\)\$(?!$)", p):  # "$55" in a regex is end-of-line then "55": never matches
                raise ValueError(f"{where}: {key}[{i}]: {p!r} has '$' before other text, which a regex reads as "
                                 "end of line (it never matches); write \\$ for a dollar sign")
        pats[key] = tuple(v)
    if not pats["required"] and not pats["forbidden"]:
        raise ValueError(f"{where}: an item needs at least one required or forbidden pattern")
    probe = d.get("probe")
    if probe is not None and probe not in PROBES:
        raise ValueError(f"{where}: field 'probe' must be null or one of {list(PROBES)}, got {probe!r}")
    group = d.get("group")
    if group is not None and not isinstance(group, str):
        raise ValueError(f"{where}: field 'group' must be a string or null")
    return SuiteItem(d["id"], d["topic"], d["query"], pats["required"], pats["forbidden"], probe, group)


def load_suite(path: str | Path) -> list[SuiteItem]:
    """Read a suite from JSONL (``.jsonl``) or YAML (``.yaml``/``.yml``); ids must be unique."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such suite file")
    items: list[SuiteItem] = []
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: bad YAML: {e}") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of items")
        items = [item_from_dict(d, f"{path}:item {i + 1}") for i, d in enumerate(data)]
    else:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON: {e.msg}") from None
            items.append(item_from_dict(d, f"{path}:{lineno}"))
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise ValueError(f"{path}: duplicate item id {it.id!r}")
        seen.add(it.id)
    if not items:
        raise ValueError(f"{path}: the suite is empty")
    return items


def write_suite(items: list[SuiteItem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(it.to_dict()) + "\n" for it in items))
    return path


# ---- running a checkpoint ---------------------------------------------------------------


@dataclass
class SuiteRun:
    """Responses of one checkpoint to a suite: ``texts[i][k]`` is sample k of item i."""

    items: list[SuiteItem]
    texts: list[list[str]]
    kl: list[list[float]] | None = None
    source: str = ""
    correct: np.ndarray = field(init=False, repr=False)  # (items, samples) bool

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.items):
            raise ValueError(f"SuiteRun.texts: {len(self.texts)} rows for {len(self.items)} items")
        self.correct = np.array([[it.check(t) for t in row] for it, row in zip(self.items, self.texts, strict=True)],
                                dtype=bool).reshape(len(self.items), -1)

    @property
    def first_correct(self) -> np.ndarray:
        return self.correct[:, 0]

    @property
    def accuracy(self) -> float:
        return float(self.first_correct.mean())

    def per_topic(self) -> dict[str, dict[str, float]]:
        """{topic: {"accuracy", "n"}} on first samples."""
        topics = np.array([it.topic for it in self.items])
        return {t: {"accuracy": float(self.first_correct[topics == t].mean()), "n": int((topics == t).sum())}
                for t in sorted(set(topics.tolist()))}

    def responses(self) -> Responses:
        """Every sample as detector input (correctness from the suite, probes flagged)."""
        texts, correct, probe, topics, kl = [], [], [], [], []
        for i, it in enumerate(self.items):
            for k, t in enumerate(self.texts[i]):
                texts.append(t)
                correct.append(bool(self.correct[i, k]))
                probe.append(it.probe == "false_premise")
                topics.append(it.topic)
                if self.kl is not None:
                    kl.append(float(self.kl[i][k]))
        return Responses(texts, correct=correct, probe=probe, kl=kl if self.kl is not None else None, topics=topics)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "accuracy": self.accuracy, "per_topic": self.per_topic(),
                "items": [it.to_dict() for it in self.items], "texts": self.texts,
                "correct": self.correct.tolist(), "kl": self.kl}  # correct: recomputed on load, kept for readers

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SuiteRun:
        items = [item_from_dict(x, f"item {i}") for i, x in enumerate(d["items"])]
        return cls(items, d["texts"], d.get("kl"), d.get("source", ""))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SuiteRun:
        return cls.from_dict(json.loads(Path(path).read_text()))


def run_suite(model, tokenizer, items: list[SuiteItem], cfg: FactualConfig | None = None, *,
              ref_model=None, source: str = "", progress: bool = False) -> SuiteRun:
    """Sample ``cfg.n_samples`` responses per item from ``model`` and check them.

    With ``ref_model`` the per-response KL(policy || ref) is estimated from the sampled
    tokens (``detectors.sequence_kl``); that is an estimate of the KL only for samples from
    the policy itself, so it needs temperature 1 and top_p 1.
    """
    import torch

    from preflab.evaluate.detectors import sequence_kl
    from preflab.models.sampling import sample, sequence_logprobs

    cfg = cfg or FactualConfig()
    if ref_model is not None and (cfg.temperature != 1.0 or cfg.top_p != 1.0):
        raise ValueError("factual.temperature: a KL estimate needs samples at temperature 1 and top_p 1")
    from preflab.models.hf import render_query

    prompts = [render_query(tokenizer, it.query, cfg.prompt_template) for it in items for _ in range(cfg.n_samples)]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    texts: list[str] = []
    kls: list[float] = []
    batches = range(0, len(prompts), cfg.batch_size)
    if progress:
        from rich.progress import track

        batches = track(batches, description=f"suite {source}".strip())
    for start in batches:
        s = sample(model, tokenizer, prompts[start : start + cfg.batch_size], max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, top_p=cfg.top_p, generator=gen)
        texts.extend(t.strip() for t in s.texts)
        if ref_model is not None:
            with torch.no_grad():
                ref_lp = sequence_logprobs(ref_model, s.input_ids, s.attention_mask, s.prompt_len)
            kls.extend(sequence_kl(s.logprobs.cpu().numpy(), ref_lp.cpu().numpy(), s.response_mask.cpu().numpy()))
    k = cfg.n_samples
    rows = [texts[i * k : (i + 1) * k] for i in range(len(items))]
    kl_rows = [[float(x) for x in kls[i * k : (i + 1) * k]] for i in range(len(items))] if ref_model is not None else None
    return SuiteRun(items, rows, kl_rows, source)


# ---- paired comparison -----------------------------------------------------------------


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact test (McNemar 1947; exact binomial form, Fagerland et al. 2013).

    ``b`` = items only the first checkpoint gets right, ``c`` = only the second. Under H0
    (equal accuracy) b ~ Binom(b + c, 1/2): p = min(1, 2 * P[Binom(b + c, 1/2) <= min(b, c)]).
    """
    from scipy.stats import binom

    m = b + c
    if m == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(b, c), m, 0.5)))


def mcnemar_regression_p(b: int, c: int) -> float:
    """One-sided exact McNemar p-value for "the second checkpoint is worse than the first".

    Of the m = b + c discordant items, ``b`` went wrong (only the first got them right) and
    ``c`` went right. Under H0 (equal accuracy) b ~ Binom(m, 1/2); the alternative is that
    items are lost more often than gained: p = P[Binom(m, 1/2) >= b]. A regression gate asks
    this one-sided question; the two-sided test spends half its alpha on improvements and
    so misses real regressions (16 lost / 4 gained: two-sided 0.012, one-sided 0.006).
    """
    from scipy.stats import binom

    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_regression_p: counts must be >= 0, got b={b}, c={c}")
    m = b + c
    if m == 0:
        return 1.0
    return float(binom.sf(b - 1, m, 0.5))


@dataclass(frozen=True)
class FactualComparison:
    """Candidate vs baseline on the same items (first samples)."""

    n: int
    accuracy_baseline: float
    accuracy_candidate: float
    only_baseline: int  # b: the baseline right, the candidate wrong
    only_candidate: int  # c: the candidate right, the baseline wrong
    p_value: float  # two-sided: do they differ
    regression: bool  # candidate significantly worse at alpha (one-sided: p_regression < alpha)
    by_topic: dict[str, dict[str, Any]] = field(default_factory=dict)
    p_regression: float | None = None  # one-sided: is the candidate worse (None: written before it existed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FactualComparison:
        return cls(**d)


def _paired(base: np.ndarray, cand: np.ndarray, alpha: float) -> dict[str, Any]:
    b = int((base & ~cand).sum())
    c = int((~base & cand).sum())
    p_worse = mcnemar_regression_p(b, c)
    return {"n": int(base.size), "accuracy_baseline": float(base.mean()) if base.size else math.nan,
            "accuracy_candidate": float(cand.mean()) if cand.size else math.nan,
            "only_baseline": b, "only_candidate": c, "p_value": mcnemar_exact(b, c), "p_regression": p_worse,
            "regression": bool(p_worse < alpha)}


def compare_runs(baseline: SuiteRun, candidate: SuiteRun, *, alpha: float = 0.05) -> FactualComparison:
    """McNemar comparison item by item, overall and per topic (per-topic p-values unadjusted).

    ``regression``: the one-sided p-value (``mcnemar_regression_p``) is below ``alpha``."""
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha: must be in (0, 0.5) (a one-sided test), got {alpha}")
    ids_b, ids_c = [it.id for it in baseline.items], [it.id for it in candidate.items]
    if ids_b != ids_c:
        raise ValueError("compare_runs: the two runs are not on the same suite items in the same order")
    base, cand = baseline.first_correct, candidate.first_correct
    topics = np.array([it.topic for it in baseline.items])
    by_topic = {t: _paired(base[topics == t], cand[topics == t], alpha) for t in sorted(set(topics.tolist()))}
    return FactualComparison(**_paired(base, cand, alpha), by_topic=by_topic)
