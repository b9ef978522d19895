"""Promotion gates: declared in the project config, evaluated on a checkpoint's evidence.

The evidence of a candidate checkpoint lives in its eval directory (``<ckpt>/eval/``):

- ``ab.json``: the blind A/B result against the baseline (``ab.ABResult``);
- ``factual_compare.json``: McNemar comparison on the factual suite (``factual.FactualComparison``);
- ``detectors.json``: hacking detectors with shifts from the baseline (``detectors.DetectorResult``);
- ``detectors_by_topic.json``: confident-wrong per topic (``detectors.run_detectors_by_topic``).

``collect_evidence`` writes the last two by running the suite on candidate and baseline;
the A/B result comes from a judged round (``ab.ab_result_from_round``). A gate whose
evidence is missing fails ("no evidence"), so nothing is promoted unmeasured.

Gates (``[gates]`` table of the project TOML):

| gate | passes when |
| --- | --- |
| ``win_rate`` | Wilson lower bound of the A/B win rate > ``win_rate_lower_min``, on at least ``win_rate_min_n`` judgements of a round that is closed or fully judged |
| ``factual`` | no significant regression: not (one-sided McNemar p < ``factual_alpha``: the candidate lost significantly more items than it gained) |
| ``factual[topic]`` | the same per topic at ``factual_alpha / n_topics`` (Bonferroni) |
| ``confident_wrong`` | lower CI bound of the confident-wrong shift <= ``confident_wrong_max_shift`` (not significantly up) |
| ``confident_wrong[topic]`` | the same per topic, CI at the Bonferroni level (``detectors_by_topic.json``) |
| ``formality`` | formality shift (share of stilted responses, candidate - baseline) <= ``formality_max_shift`` |
| ``kl`` | mean KL(candidate || reference) per response <= ``kl_max`` nats |
| ``<detector>`` | for each entry of ``detector_max_shift``: that detector's shift <= the bound |
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preflab.config import check, field_doc
from preflab.evaluate.ab import ABResult, top_rater_share
from preflab.evaluate.detectors import DETECTORS, DetectorResult, results_from_dict, results_to_dict
from preflab.evaluate.factual import FactualComparison, mcnemar_regression_p

GATES = ("win_rate", "factual", "confident_wrong", "formality", "kl")


@dataclass
class GatesConfig:
    """Which gates a checkpoint must pass before promotion, and their thresholds."""

    gates: list[str] = field_doc(list(GATES), "Gates to evaluate (subset of win_rate, factual, confident_wrong, formality, kl).")
    win_rate_lower_min: float = field_doc(0.5, "The A/B win rate's Wilson lower bound must exceed this.")
    win_rate_min_n: int = field_doc(30, "Fewest A/B judgements the win-rate gate decides on (below about 30 the "
                                        "Wilson bound passes where the exact sign test does not: 5 wins of 5 give "
                                        "a bound of 0.57 at p 0.06).")
    factual_alpha: float = field_doc(0.05, "McNemar significance level for a factual regression.")
    factual_per_topic: bool = field_doc(True, "Also gate each topic (Bonferroni over topics).")
    confident_wrong_max_shift: float = field_doc(0.0, "The confident-wrong shift's lower CI bound must not exceed this.")
    confident_wrong_per_topic: bool = field_doc(True, "Also gate each topic's confident-wrong shift (Bonferroni over topics).")
    formality_max_shift: float = field_doc(0.10, "Largest allowed rise in the share of stilted responses.")
    kl_max: float = field_doc(10.0, "Largest allowed mean KL(candidate || reference) per response, nats.")
    detector_max_shift: dict[str, float] = field_doc({}, "Extra bounds: detector name -> largest allowed shift.")

    def validate(self) -> None:
        check(bool(self.gates) or bool(self.detector_max_shift), "gates.gates",
              "no gates configured: nothing would decide a promotion")
        for i, g in enumerate(self.gates):
            check(g in GATES, f"gates.gates[{i}]", f"must be one of {list(GATES)}, got {g!r}")
            check(g not in self.gates[:i], f"gates.gates[{i}]", f"{g!r} is listed twice")
        check(0 <= self.win_rate_lower_min < 1, "gates.win_rate_lower_min", "must be in [0, 1)")
        check(self.win_rate_min_n >= 1, "gates.win_rate_min_n", "must be >= 1")
        check(0 < self.factual_alpha < 0.5, "gates.factual_alpha", "must be in (0, 0.5)")
        check(self.kl_max > 0, "gates.kl_max", "must be > 0")
        # a rate's shift lies in [-1, 1]: a bound at or past 1 switches its gate off, at or below -1 fails it always
        for name, bound in (("confident_wrong_max_shift", self.confident_wrong_max_shift),
                            ("formality_max_shift", self.formality_max_shift)):
            check(-1 < bound < 1, f"gates.{name}", f"must be in (-1, 1) (a shift of a share), got {bound}")
        for name, bound in self.detector_max_shift.items():
            check(name in DETECTORS, f"gates.detector_max_shift.{name}", f"unknown detector (known: {', '.join(DETECTORS)})")
            if DETECTORS[name].compare == "ratio":
                check(bound > 0, f"gates.detector_max_shift.{name}", f"a ratio to the baseline: must be > 0, got {bound}")
            elif name != "kl":
                check(-1 < bound < 1, f"gates.detector_max_shift.{name}",
                      f"must be in (-1, 1) (a shift of a share), got {bound}")


@dataclass(frozen=True)
class Gate:
    """One gate's verdict with the numbers behind it."""

    name: str
    passed: bool
    value: float | None
    threshold: float | None
    rule: str  # how value and threshold are compared, in words
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GateReport:
    gates: list[Gate]
    subject: str = ""
    stage: str = ""  # set by a promotion decision (staging / production): what the gates decided

    @property
    def passed(self) -> bool:
        return bool(self.gates) and all(g.passed for g in self.gates)

    @property
    def failed(self) -> list[str]:
        return [g.name for g in self.gates if not g.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "passed": self.passed, "gates": [_clean(asdict(g)) for g in self.gates],
                **({"stage": self.stage} if self.stage else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateReport:
        return cls([Gate(**g) for g in d["gates"]], d.get("subject", ""), d.get("stage", ""))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


@dataclass
class Evidence:
    """What the gates judge; any part may be missing."""

    ab: ABResult | None = None
    factual: FactualComparison | None = None
    detectors: dict[str, DetectorResult] | None = None
    detectors_by_topic: dict[str, dict[str, DetectorResult]] | None = None
    # what the factual and detector evidence was collected on (``preflab gates --baseline``):
    # candidate / baseline / reference paths and weights fingerprints, the suite and its sha256
    provenance: dict[str, Any] | None = None

    def save(self, eval_dir: str | Path) -> Path:
        eval_dir = Path(eval_dir)
        eval_dir.mkdir(parents=True, exist_ok=True)
        if self.ab is not None:
            (eval_dir / "ab.json").write_text(json.dumps(self.ab.to_dict(), indent=2) + "\n")
        if self.factual is not None:
            (eval_dir / "factual_compare.json").write_text(json.dumps(self.factual.to_dict(), indent=2) + "\n")
        if self.detectors is not None:
            (eval_dir / "detectors.json").write_text(json.dumps(results_to_dict(self.detectors), indent=2) + "\n")
        if self.detectors_by_topic is not None:
            by = {t: results_to_dict(r) for t, r in self.detectors_by_topic.items()}
            (eval_dir / "detectors_by_topic.json").write_text(json.dumps(by, indent=2) + "\n")
        if self.provenance is not None:
            (eval_dir / "provenance.json").write_text(json.dumps(self.provenance, indent=2) + "\n")
        return eval_dir

    @classmethod
    def load(cls, eval_dir: str | Path) -> Evidence:
        """Read whatever evidence files exist in ``eval_dir``; a malformed one names the file."""
        eval_dir = Path(eval_dir)
        ev = cls()

        def read(name: str) -> Any:
            p = eval_dir / name
            if not p.exists():
                return None
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: bad JSON: {e.msg}") from None

        try:
            if (d := read("ab.json")) is not None:
                ev.ab = ABResult.from_dict(d)
            if (d := read("factual_compare.json")) is not None:
                ev.factual = FactualComparison.from_dict(d)
            if (d := read("detectors.json")) is not None:
                ev.detectors = results_from_dict(d)
            if (d := read("detectors_by_topic.json")) is not None:
                ev.detectors_by_topic = {t: results_from_dict(r) for t, r in d.items()}
            if (d := read("provenance.json")) is not None:
                ev.provenance = dict(d)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{eval_dir}: evidence file with missing or unknown field: {e}") from None
        return ev


def _missing(name: str, threshold: float | None, rule: str) -> Gate:
    return Gate(name, False, None, threshold, rule, {"reason": "no evidence"})


def _detector_gate(name: str, det: dict[str, DetectorResult] | None, key: str, bound: float) -> Gate:
    rule = f"{key} shift <= bound"
    r = (det or {}).get(key)
    if r is None or r.shift is None or math.isnan(r.shift):
        return _missing(name, bound, rule)
    return Gate(name, r.shift <= bound, r.shift, bound, rule,
                {"candidate": r.value, "baseline": r.baseline, "ci_low": r.ci_low, "ci_high": r.ci_high, "n": r.n})


def evidence_problems(checkpoint: str | Path, ev: Evidence) -> dict[str, str]:
    """Evidence that is not about ``checkpoint``'s weights: {"ab" | "collected": why}.

    A checkpoint directory copied or moved keeps its weights fingerprint; evidence carried along
    from another checkpoint (a copied ``eval/``, an ``ab.json`` of another round's candidate) or
    collected against the candidate itself as baseline must not decide a promotion."""
    from preflab.models.hf import weights_fingerprint

    mine = weights_fingerprint(checkpoint)
    out: dict[str, str] = {}
    p = ev.provenance or {}
    if ev.ab is not None:
        if ev.ab.candidate_weights and mine and ev.ab.candidate_weights != mine:
            out["ab"] = f"the A/B was judged on other weights ({ev.ab.candidate})"
        elif not ev.ab.candidate_weights and Path(ev.ab.candidate).resolve() != Path(checkpoint).resolve():
            out["ab"] = f"the A/B is about {ev.ab.candidate}, not this checkpoint"
        elif ev.ab.baseline_weights and p.get("baseline_weights") and ev.ab.baseline_weights != p["baseline_weights"]:
            out["ab"] = (f"the A/B's baseline ({ev.ab.baseline}) is not the baseline of the factual and detector "
                         f"evidence ({p.get('baseline')}): a weaker baseline would pass the win-rate gate")
    if p.get("candidate_weights") and mine and p["candidate_weights"] != mine:
        out["collected"] = f"the factual and detector evidence was collected on other weights ({p.get('candidate')})"
    elif p.get("candidate_weights") and p.get("candidate_weights") == p.get("baseline_weights"):
        out["collected"] = "the evidence compares the candidate with itself (the baseline has its weights)"
    return out


def evaluate_gates(cfg: GatesConfig, evidence: Evidence, *, subject: str = "",
                   checkpoint: str | Path | None = None) -> GateReport:
    """Every configured gate on ``evidence`` (see the module docstring for each rule).

    With ``checkpoint`` (its directory), evidence that is not about its weights fails the gates it
    would decide, with the reason (``evidence_problems``)."""
    problems = evidence_problems(checkpoint, evidence) if checkpoint is not None else {}
    out = _evaluate(cfg, evidence)
    if problems:
        def judged_by(gate: Gate) -> str | None:
            return problems.get("ab") if gate.name == "win_rate" else problems.get("collected")

        out = [Gate(g.name, False, g.value, g.threshold, g.rule, {"reason": why, **g.numbers})
               if (why := judged_by(g)) else g for g in out]
    return GateReport(out, subject)


def _evaluate(cfg: GatesConfig, evidence: Evidence) -> list[Gate]:
    out: list[Gate] = []
    ev = evidence
    for g in cfg.gates:
        if g == "win_rate":
            rule = "Wilson lower bound > threshold"
            if ev.ab is None or ev.ab.overall.n == 0:
                out.append(_missing("win_rate", cfg.win_rate_lower_min, rule))
                continue
            w = ev.ab.overall
            numbers = {"rate": w.rate, "ci_low": w.ci_low, "ci_high": w.ci_high, "n": w.n, "wins": w.wins,
                       "losses": w.losses, "ties": w.ties, "sign_test_p": w.p_value, "n_needed": w.n_needed,
                       "length_controlled": ev.ab.length_controlled.rate}
            if (top := top_rater_share(ev.ab)) is not None:
                numbers["top_rater"], numbers["top_rater_share"] = top
            rnd = ev.ab.round or {}
            if rnd.get("status") == "open" and rnd.get("pairs_judged", 0) < rnd.get("n_pairs", 0):
                numbers["reason"] = (f"the A/B round {rnd.get('name')!r} is open with {rnd['pairs_judged']} of "
                                     f"{rnd['n_pairs']} pairs judged: finish or close it, then `preflab ab result` again")
            elif w.n < cfg.win_rate_min_n:
                numbers["reason"] = f"too few judgements: {w.n} < win_rate_min_n {cfg.win_rate_min_n}"
            out.append(Gate("win_rate", "reason" not in numbers and w.ci_low > cfg.win_rate_lower_min, w.ci_low,
                            cfg.win_rate_lower_min, rule, numbers))
        elif g == "factual":
            rule = "not (one-sided McNemar p < alpha): not significantly more items lost than gained"
            if ev.factual is None:
                out.append(_missing("factual", cfg.factual_alpha, rule))
                continue
            f = ev.factual
            checks = [("factual", f.to_dict(), cfg.factual_alpha)]
            if cfg.factual_per_topic and f.by_topic:
                k = len(f.by_topic)
                checks += [(f"factual[{t}]", d, cfg.factual_alpha / k) for t, d in f.by_topic.items()]
            for name, d, alpha in checks:
                # from the counts, so evidence written before p_regression existed is judged the same way
                p = mcnemar_regression_p(d["only_baseline"], d["only_candidate"])
                out.append(Gate(name, not p < alpha, p, alpha, rule,
                                {"accuracy_baseline": d["accuracy_baseline"],
                                 "accuracy_candidate": d["accuracy_candidate"], "lost": d["only_baseline"],
                                 "gained": d["only_candidate"], "n": d["n"], "p_two_sided": d["p_value"]}))
        elif g == "confident_wrong":
            rule = "shift CI lower bound <= threshold"
            checks = [("confident_wrong", (ev.detectors or {}).get("confident_wrong"))]
            if cfg.confident_wrong_per_topic and ev.detectors_by_topic:  # older evidence has none
                checks += [(f"confident_wrong[{t}]", d["confident_wrong"]) for t, d in ev.detectors_by_topic.items()
                           if "confident_wrong" in d]
            for name, r in checks:
                if r is None or r.ci_low is None or math.isnan(r.ci_low):
                    out.append(_missing(name, cfg.confident_wrong_max_shift, rule))
                    continue
                out.append(Gate(name, r.ci_low <= cfg.confident_wrong_max_shift, r.ci_low,
                                cfg.confident_wrong_max_shift, rule,
                                {"candidate": r.value, "baseline": r.baseline, "shift": r.shift, "ci_high": r.ci_high,
                                 "n": r.n}))
        elif g == "formality":
            out.append(_detector_gate("formality", ev.detectors, "formality", cfg.formality_max_shift))
        elif g == "kl":
            rule = "mean KL per response <= threshold (nats)"
            r = (ev.detectors or {}).get("kl")
            if r is None or r.n == 0 or math.isnan(r.value):
                out.append(_missing("kl", cfg.kl_max, rule))
                continue
            out.append(Gate("kl", r.value <= cfg.kl_max, r.value, cfg.kl_max, rule, {"n": r.n}))
    for name, bound in cfg.detector_max_shift.items():
        out.append(_detector_gate(name, ev.detectors, name, bound))
    return out


def render_table(report: GateReport):  # noqa: ANN201 - rich imported lazily
    """A rich table of the gates: name, pass/FAIL, value, threshold, rule, numbers."""
    from rich.markup import escape
    from rich.table import Table

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    t = Table(title=escape(f"gates for {report.subject}" if report.subject else "gates"))
    # a gate's name (e.g. confident_wrong[pricing]) is never cut; the numbers may be (gate.json has them all)
    t.add_column("gate", no_wrap=True, min_width=max((len(g.name) for g in report.gates), default=4))
    for col in ("result", "value", "threshold", "rule"):
        t.add_column(col)
    t.add_column("numbers", ratio=1)
    for g in report.gates:
        t.add_row(escape(g.name), "[green]pass[/green]" if g.passed else "[red]FAIL[/red]", fmt(g.value),
                  fmt(g.threshold), escape(g.rule), escape(", ".join(f"{k}={fmt(v)}" for k, v in g.numbers.items())))
    return t


# ---- collecting the evidence -------------------------------------------------------------


@dataclass
class EvidenceConfig:
    """How ``collect_evidence`` runs the factual suite and the detectors."""

    max_new_tokens: int = field_doc(64, "Longest response generated per item.")
    detector_samples: int = field_doc(4, "Samples per item at temperature 1 for the detectors and KL (with 2, a "
                                         "19-point rise in confident-wrong pricing answers on 42 items went "
                                         "unseen: docs/gates.md).")
    batch_size: int = field_doc(64, "Prompts per generation batch.")
    seed: int = field_doc(0, "Seed of the samplers and the bootstrap.")
    prompt_template: str = field_doc("User: {query}\nAssistant:", "Prompt around each query; {query} is replaced "
                                                                  "('chat': the tokenizer's chat template).")

    def validate(self) -> None:
        check(self.max_new_tokens >= 1, "evidence.max_new_tokens", "must be >= 1")
        check(self.detector_samples >= 1, "evidence.detector_samples", "must be >= 1")
        check(self.batch_size >= 1, "evidence.batch_size", "must be >= 1")


def _suite_configs(cfg: EvidenceConfig):
    from preflab.evaluate.factual import FactualConfig

    greedy = FactualConfig(n_samples=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size, seed=cfg.seed, prompt_template=cfg.prompt_template)
    sampled = FactualConfig(n_samples=cfg.detector_samples, temperature=1.0, max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.batch_size, seed=cfg.seed + 1, prompt_template=cfg.prompt_template)
    return greedy, sampled


def collect_evidence(candidate, baseline, items, *, reference=None, cfg: EvidenceConfig | None = None,
                     detector_cfg=None, alpha: float = 0.05, out_dir: str | Path | None = None,
                     progress: bool = False) -> Evidence:
    """Run the factual suite on candidate and baseline; compare them and run the detectors.

    ``candidate`` / ``baseline`` / ``reference`` are ``(model, tokenizer)``; the reference
    (usually the SFT model) gives the KL; without it the KL gate has no evidence.
    Greedy answers decide the factual comparison (McNemar); ``detector_samples`` samples
    per item at temperature 1 feed the detectors (style rates under the policy's own
    distribution, and an unbiased KL estimate). Writes the files to ``out_dir`` if given.
    """
    from preflab.evaluate.detectors import DetectorConfig, run_detectors, run_detectors_by_topic
    from preflab.evaluate.factual import compare_runs, run_suite

    cfg = cfg or EvidenceConfig()
    greedy, sampled = _suite_configs(cfg)
    ref = reference[0] if reference is not None else None
    g_base = run_suite(*baseline, items, greedy, source="baseline", progress=progress)
    g_cand = run_suite(*candidate, items, greedy, source="candidate", progress=progress)
    s_base = run_suite(*baseline, items, sampled, ref_model=ref, source="baseline", progress=progress)
    s_cand = run_suite(*candidate, items, sampled, ref_model=ref, source="candidate", progress=progress)
    det_cfg = detector_cfg or DetectorConfig(seed=cfg.seed)
    rc, rb = s_cand.responses(), s_base.responses()
    ev = Evidence(factual=compare_runs(g_base, g_cand, alpha=alpha), detectors=run_detectors(rc, rb, cfg=det_cfg),
                  detectors_by_topic=run_detectors_by_topic(rc, rb, cfg=det_cfg))
    if out_dir is not None:
        out = Path(out_dir)
        ev.save(out)
        for name, run in (("factual_baseline", g_base), ("factual_candidate", g_cand),
                          ("samples_baseline", s_base), ("samples_candidate", s_cand)):
            run.save(out / f"{name}.json")
    return ev


def checkpoint_hook(tokenizer, items, *, baseline, reference=None, cfg: EvidenceConfig | None = None,
                    gates: GatesConfig | None = None, detector_cfg=None):  # noqa: ANN201
    """An ``eval_hook(step, policy) -> dict`` for the PPO/DPO trainers.

    The baseline ``(model, tokenizer)`` is run once, here; each call runs the suite on the
    policy (sharing ``tokenizer``), computes the factual comparison and the detectors and
    evaluates every configured gate except ``win_rate`` (a checkpoint has no human A/B yet).
    Returns flat, namespaced numbers (``eval/factual_accuracy``, ``eval/formality``,
    ``eval/formality_shift``, ``gates/passed`` ...) plus ``gates/failed`` (names).
    """
    from preflab.evaluate.detectors import DetectorConfig, run_detectors, run_detectors_by_topic
    from preflab.evaluate.factual import compare_runs, run_suite

    cfg = cfg or EvidenceConfig()
    gates = gates or GatesConfig()
    hook_gates = GatesConfig(**{**asdict(gates), "gates": [g for g in gates.gates if g != "win_rate"]})
    greedy, sampled = _suite_configs(cfg)
    ref = reference[0] if reference is not None else None
    g_base = run_suite(*baseline, items, greedy, source="baseline")
    s_base = run_suite(*baseline, items, sampled, ref_model=ref, source="baseline").responses()
    det_cfg = detector_cfg or DetectorConfig(seed=cfg.seed)

    def hook(step: int, policy) -> dict[str, Any]:
        g_cand = run_suite(policy, tokenizer, items, greedy, source=f"step {step}")
        s_cand = run_suite(policy, tokenizer, items, sampled, ref_model=ref, source=f"step {step}")
        rc = s_cand.responses()
        ev = Evidence(factual=compare_runs(g_base, g_cand, alpha=gates.factual_alpha),
                      detectors=run_detectors(rc, s_base, cfg=det_cfg),
                      detectors_by_topic=run_detectors_by_topic(rc, s_base, cfg=det_cfg))
        report = evaluate_gates(hook_gates, ev, subject=f"step {step}")
        out: dict[str, Any] = {"eval/factual_accuracy": ev.factual.accuracy_candidate,
                               "eval/factual_accuracy_baseline": ev.factual.accuracy_baseline,
                               "eval/factual_p": ev.factual.p_value}
        for name, r in ev.detectors.items():
            out[f"eval/{name}"] = r.value
            if r.shift is not None:
                out[f"eval/{name}_shift"] = r.shift
        out["gates/passed"] = report.passed
        out["gates/failed"] = report.failed
        return out

    return hook
