"""The ``preflab`` command line: parse -> load config -> call one library function -> print a summary.

Commands stay thin; heavy libraries are imported inside each command so ``preflab --help``
is instant. Sub-command groups: ``sandbox``, ``rm``, ``quality``, ``guidelines``, ``outcomes``.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from preflab.config import ConfigError
from preflab.quality.consistency import MIN_CEILING_DUPLICATES

app = typer.Typer(help="preflab: an RLHF workbench, from calibrated raters to a promoted policy.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
sandbox_app = typer.Typer(help="The simulated support domain and its base model.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")

# errors name long paths: never break them; piped into a log (no terminal, no $COLUMNS), tables get
# 160 columns rather than rich's 80, which folds a gate table's every cell
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)
# the store option shared by every command that works on one
_DB_OPT = typer.Option("sqlite:///preflab.db", "--db", help="SQLAlchemy URL (or SQLite path) of the store.")
_THREADS_OPT = typer.Option(None, "--threads", min=1, show_default=False,
                            help="torch CPU threads (default: torch's choice, all cores; 1 or 2 on a shared machine).")
ROUNDS_HELP = ("With --db: round kinds to train on, comma-separated (default calibration,collection,rerate; "
               "the demo: collection,rerate).")


@app.callback()
def _root() -> None:
    """preflab: an RLHF workbench."""
    # our rich bar is the progress of a job; transformers would add a bar per model load (read by
    # huggingface_hub when transformers is imported, which commands do later). An explicit setting wins.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@app.command()
def version() -> None:
    """Print the preflab version."""
    from preflab import __version__

    console.print(f"preflab {__version__}")


# ---- sandbox --------------------------------------------------------------------------


@sandbox_app.command("build")
def sandbox_build(
    out: str = typer.Option(..., "--out", help="Directory of the base model (a Hugging Face model dir); "
                                               "re-running continues an interrupted build."),
    config: str = typer.Option(None, "--config", help="TOML file with a \\[build] table of BuildConfig fields."),
    seed: int = typer.Option(None, help="Seed of the corpus, tokenizer text, init and data order."),
    steps: int = typer.Option(None, help="SFT optimizer steps."),
    corpus_size: int = typer.Option(None, help="SFT dialogues."),
    n_layer: int = typer.Option(None, help="Transformer blocks."),
    n_embd: int = typer.Option(None, help="Model width."),
    threads: int = typer.Option(None, help="torch CPU threads (0: torch's default)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Build the sandbox base model: seeded corpus, byte-level BPE tokenizer, tiny GPT-2, SFT."""
    import json
    import time

    from preflab.config import from_dict, load_toml, to_dict
    from preflab.sandbox.build import BuildConfig, build_sandbox_model
    from preflab.train.sft import train_sft

    base = to_dict(load_toml(BuildConfig, config, "build")) if config else {}
    flags = {"seed": seed, "steps": steps, "corpus_size": corpus_size, "n_layer": n_layer, "n_embd": n_embd,
             "num_threads": threads}
    cfg = from_dict(BuildConfig, {**base, **{k: v for k, v in flags.items() if v is not None}, "progress": progress})
    t0 = time.perf_counter()
    path = build_sandbox_model(cfg, out, train_sft=train_sft)
    m = json.loads((path / "build.json").read_text())
    console.print(f"base model in {path}: {m['parameters']:,} parameters, vocab {m['vocab_size']}, "
                  f"{m['sft_steps']} SFT steps, final loss {m['final_loss']:.3f} (mean of the last 50 steps), "
                  f"{time.perf_counter() - t0:.0f} s this run")


@sandbox_app.command("sample")
def sandbox_sample(
    model: str = typer.Option(..., "--model", help="Model directory (e.g. from `preflab sandbox build`)."),
    n: int = typer.Option(8, min=1, help="Queries to answer."),
    split: str = typer.Option("heldout", help="Query split: heldout or train."),
    temperature: float = typer.Option(1.0, min=0.0, help="Sampling temperature (0 = greedy)."),
    max_new_tokens: int = typer.Option(0, min=0, help="Longest response (0: from the build, else 96)."),
    seed: int = typer.Option(0, help="Seed of the queries and the sampler."),
    show: int = typer.Option(8, min=0, help="How many samples to print."),
) -> None:
    """Sample the model on sandbox queries; print responses with their parsed styles and the style census."""
    import json
    from pathlib import Path

    from rich.table import Table

    from preflab.models.hf import load_policy
    from preflab.sandbox.build import style_census
    from preflab.sandbox.domain import generate_queries, parse

    try:
        queries = generate_queries(n, seed=seed, split=split)
        policy, tok = load_policy(model)
    except (ValueError, OSError) as e:
        _fail(e)
    if not max_new_tokens:
        manifest = Path(model) / "build.json"
        max_new_tokens = json.loads(manifest.read_text())["max_response_tokens"] + 8 if manifest.exists() else 96
    c = style_census(policy, tok, queries, seed=seed, temperature=temperature, max_new_tokens=max_new_tokens)
    t = Table("query", "response", "parsed style", show_lines=True)
    for q, text in list(zip(queries, c["texts"], strict=True))[:show]:
        p = parse(text)
        style = ("[red]unparsed[/red]" if p is None else
                 ", ".join(f"{v}" for v in p.style.to_dict().values())
                 + ("" if p.fact_id == q.fact_id else f" [yellow](states {p.fact_id})[/yellow]"))
        t.add_row(q.text, text, style)
    console.print(t)
    console.print(f"parsed {c['parse_rate']:.1%}, right fact {c['fact_match_rate']:.1%} of {c['n']} "
                  f"(temperature {temperature})")
    for axis, shares in c["style_share"].items():
        console.print(f"  {axis:11s} " + "  ".join(f"{v} {s:.1%}" for v, s in shares.items()))

# ---- serve (rater web app) --------------------------------------------------------------

@app.command()
def serve(
    db: str = _DB_OPT,
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="TCP port."),
    workers: int = typer.Option(1, min=1, max=64, help="Worker processes (safe: the app keeps no state in memory)."),
    project: str = typer.Option("default", help="Project served (created on first start)."),
    secret_key: str = typer.Option(None, envvar="PREFLAB_SECRET_KEY",
                                   help="HMAC key for sessions; random per start if unset (sessions then end on restart)."),
    cookie_secure: bool = typer.Option(False, help="Mark the session cookie Secure (behind HTTPS)."),
) -> None:
    """Run the rater web app (uvicorn); on first start create an admin and print its credentials once."""
    from pydantic import ValidationError

    from preflab.web.server import serve as run_serve

    flags = {"secret_key": "--secret-key / PREFLAB_SECRET_KEY", "database_url": "--db", "project": "--project"}
    try:
        run_serve(db_url=db, host=host, port=port, workers=workers, project=project, secret_key=secret_key,
                  cookie_secure=cookie_secure,
                  echo=lambda m: console.print(m, soft_wrap=True, markup=False, highlight=False))
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        _fail(ValueError(f"{flags.get(field, field)}: {err['msg']}"))
    except ValueError as e:  # a port in use, named before anything is created
        _fail(e)


# ---- report, outcomes (report/) ---------------------------------------------------------

outcomes_app = typer.Typer(help="Production outcomes: import logs, compare model versions.", no_args_is_help=True)
app.add_typer(outcomes_app, name="outcomes")


@app.command("report")
def report_cmd(
    run_dir: str = typer.Argument(..., help="Run directory to report on (see docs/report.md for the files read)."),
    title: str = typer.Option(None, help="Report title (default: the run directory's name)."),
    db: str = typer.Option(None, "--db", help="A real project's store: first write the rater quality, cost, "
                                              "checkpoint, A/B and factual summaries into RUN_DIR from it."),
    project: str = typer.Option("default", help="Project in --db."),
    config: str = typer.Option(None, help="With --db: project TOML whose \\[cost] table sets prices and, for the "
                                          "ROI, weekly_conversations and cost_per_escalation (docs/cost.md)."),
) -> None:
    """Write RUN_DIR/report.html (self-contained, plots embedded) and RUN_DIR/report.md."""
    from pathlib import Path

    from preflab.report.html import ReportError, render_report

    if config is not None and db is None:
        _fail(ValueError("--config: give --db too (the cost ledger is written from a project's store)"))
    if db is not None:
        from preflab.config import load_toml
        from preflab.pipeline import project_summaries
        from preflab.report.cost import CostConfig
        from preflab.store import db as store_db
        from preflab.store.ops import StoreError

        if not Path(run_dir).is_dir():
            _fail(ValueError(f"RUN_DIR: {run_dir} is not a directory"))
        try:
            cost = load_toml(CostConfig, config, "cost") if config else None
            engine = store_db.make_engine(db, create=False)
            done = project_summaries(run_dir, engine, project=project, cost=cost)
            engine.dispose()
        except (StoreError, ValueError, KeyError, OSError) as e:
            _fail(e)
        for name, what in done.items():
            console.print(f"{name}: {what}" if what == "written" else f"[yellow]{escape(what)}[/yellow]")
    try:
        rep = render_report(run_dir, title=title)
    except ReportError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    console.print(f"sections: {', '.join(rep.sections)}")
    for p in rep.problems:
        console.print(f"[yellow]warning:[/yellow] {p}")
    console.print(f"wrote {rep.html_path} and {rep.md_path}")


@outcomes_app.command("import")
def outcomes_import(
    file: str = typer.Argument(..., help="Production log: .csv (with header) or .jsonl."),
    run: str = typer.Option(..., "--run", help="Run directory; rows are appended to RUN/outcomes/logs.jsonl."),
) -> None:
    """Validate a production log and import it (all rows or none)."""
    from preflab.report.outcomes import OutcomeImportError, import_outcomes

    try:
        res = import_outcomes(file, run)
    except OutcomeImportError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    console.print(f"imported {res['imported']} conversations ({res['by_version']}); {res['total']} in {res['path']}")
    for group in res["similar_versions"]:
        console.print(f"[yellow]warning:[/yellow] model versions {escape(', '.join(map(repr, group)))} differ only by "
                      f"case: they are kept and compared as separate versions (one model? fix the labels in the log)")


@outcomes_app.command("compare")
def outcomes_compare(
    baseline: str = typer.Option(..., help="Model version before (e.g. sft)."),
    candidate: str = typer.Option(..., help="Model version after (e.g. ppo_v2)."),
    run: str = typer.Option(None, "--run", help="Run directory with imported outcomes; writes RUN/outcomes/comparison.json."),
    file: str = typer.Option(None, "--file", help="Compare straight from a log file instead (nothing written)."),
    method: str = typer.Option("newcombe", help="Interval for the escalation difference: newcombe or wald."),
    simulated: bool = typer.Option(False, help="Mark the logs as simulated in comparison.json."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="With --run: the model directory that served the "
                                   "candidate version; recorded in comparison.json so the report can tell whether "
                                   "these outcomes are the promoted checkpoint's (docs/outcomes.md)."),
) -> None:
    """Compare two model versions: escalation (two-proportion CI; Fisher's exact p at small counts), CSAT and
    handle time (Welch CIs)."""
    from pathlib import Path

    from rich.table import Table

    from preflab.report.outcomes import (
        OutcomeImportError,
        compare_versions,
        load_run_outcomes,
        not_compared,
        read_outcomes,
        write_comparison,
    )

    if (run is None) == (file is None):
        console.print("[red]error:[/red] give exactly one of --run or --file")
        raise typer.Exit(2)
    if baseline == candidate:
        _fail(ValueError(f"--candidate: the same model version as --baseline ({candidate!r}): compare two versions"))
    if checkpoint is not None and run is None:
        _fail(ValueError("--checkpoint: give --run too (it is recorded in RUN/outcomes/comparison.json)"))
    if checkpoint is not None and not Path(checkpoint).is_dir():
        _fail(ValueError(f"--checkpoint: {checkpoint} is not a directory (the model directory that served "
                         f"{candidate!r})"))
    try:
        records = read_outcomes(file) if file else load_run_outcomes(run)
        if run and not records:
            raise ValueError(f"--run: no outcomes imported in {run} (`preflab outcomes import LOG --run {run}` first)")
        comp = compare_versions(records, baseline, candidate, method=method)
    except (OutcomeImportError, ValueError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(2) from None
    n, surveys = comp["conversations"], comp["answered_surveys"]
    t = Table(title=f"{candidate} vs {baseline}")
    for c in ("metric", baseline, candidate, "difference", "95% CI", "p"):
        t.add_column(c)
    t.add_row("conversations", f"{n['baseline']:,}", f"{n['candidate']:,}", "", "", "")
    t.add_row("answered surveys", f"{surveys['baseline']:,}", f"{surveys['candidate']:,}", "", "", "")
    for name, block in (("escalation rate", comp["escalation"]), ("CSAT", comp["csat"]),
                        ("handle time (min)", comp["handle_time_min"])):
        if block:
            t.add_row(name, f"{block['baseline']:.3f}", f"{block['candidate']:.3f}", f"{block['diff']:+.3f}",
                      f"[{block['ci'][0]:+.3f}, {block['ci'][1]:+.3f}]", f"{block['p_value']:.2g}")
    console.print(t)
    console.print("escalation p: " + ("Fisher's exact test (an expected count below 5)"
                                      if comp["escalation"]["test"] == "fisher" else "pooled two-proportion z-test")
                  + f"; interval: {comp['escalation']['method']}; CSAT and handle time: Welch")
    for why in not_compared(comp):
        console.print(f"[yellow]warning:[/yellow] {escape(why)}")
    if run:
        console.print(f"wrote {write_comparison(run, comp, simulated=simulated, checkpoint=checkpoint)}")


# ---- evaluation: factual, ab, gates, promote, diagnose (evaluate/) ------------------------

factual_app = typer.Typer(help="Factual regression suites: build, run a checkpoint, compare two.", no_args_is_help=True)
app.add_typer(factual_app, name="factual")
ab_app = typer.Typer(help="Blind A/B evaluation rounds: create from two checkpoints, score the judgements.",
                     no_args_is_help=True)
app.add_typer(ab_app, name="ab")


def _fail(e: Exception) -> None:
    console.print(f"[red]error:[/red] {escape(str(e))}")
    raise typer.Exit(2) from None


_PROMPT_FORMAT_OPT = typer.Option("dialogue", "--prompt-format",
                                  help="How the model sees a query: dialogue ('User: ...\\nAssistant:') | raw | "
                                       "chat (its tokenizer's chat template).")


def _template(prompt_format: str) -> str:
    """The evaluators' prompt template for a ``--prompt-format`` (the trainers' formats as templates)."""
    from preflab.models.hf import CHAT
    from preflab.pipeline import PROMPT_TEMPLATE

    templates = {"dialogue": PROMPT_TEMPLATE, "raw": "{query}", "chat": CHAT}
    if prompt_format not in templates:
        raise ValueError(f"--prompt-format: must be dialogue, raw or chat, got {prompt_format!r}")
    return templates[prompt_format]


def _gates_cfg(config: str | None):
    from preflab.config import load_toml
    from preflab.evaluate.gates import GatesConfig

    return load_toml(GatesConfig, config, "gates") if config else GatesConfig()


@factual_app.command("sandbox-suite")
def factual_sandbox_suite(
    out: str = typer.Argument(..., help="JSONL file to write."),
    n: int = typer.Option(150, min=1, help="Items (spread over every fact, pricing included)."),
    seed: int = typer.Option(0, help="Seed of the held-out query choice."),
) -> None:
    """Write the sandbox's factual suite (from the knowledge base, held-out queries)."""
    from preflab.sandbox.factual_suite import write_sandbox_suite

    try:
        console.print(f"wrote {write_sandbox_suite(out, n, seed=seed)} ({n} items)")
    except ValueError as e:
        _fail(e)


@factual_app.command("run")
def factual_run(
    checkpoint: str = typer.Argument(..., help="Hugging Face model directory."),
    suite: str = typer.Option(..., help="Suite file (.jsonl or .yaml)."),
    samples: int = typer.Option(1, min=1, help="Responses per item (the first counts for accuracy)."),
    temperature: float = typer.Option(0.0, min=0.0, help="Sampling temperature; 0 = greedy."),
    max_new_tokens: int = typer.Option(64, min=1, help="Longest response."),
    seed: int = typer.Option(0, help="Sampler seed."),
    out: str = typer.Option(None, help="JSON file for the run (default CHECKPOINT/eval/factual.json)."),
    prompt_format: str = _PROMPT_FORMAT_OPT,
    threads: int = _THREADS_OPT,
) -> None:
    """Run a checkpoint against a suite: accuracy overall and per topic."""
    _set_threads(threads)
    from pathlib import Path

    from rich.table import Table

    from preflab.evaluate.factual import FactualConfig, load_suite, run_suite
    from preflab.models.hf import load_policy

    try:
        items = load_suite(suite)
        cfg = FactualConfig(n_samples=samples, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                            prompt_template=_template(prompt_format))
        cfg.validate()
        model, tok = load_policy(checkpoint)
        run = run_suite(model, tok, items, cfg, source=str(Path(checkpoint).resolve()), progress=True)
    except (ValueError, OSError) as e:
        _fail(e)
    path = run.save(out or Path(checkpoint) / "eval" / "factual.json")
    t = Table(title=f"factual accuracy of {checkpoint}")
    for c in ("topic", "items", "accuracy"):
        t.add_column(c)
    for topic, d in run.per_topic().items():
        t.add_row(topic, str(d["n"]), f"{d['accuracy']:.1%}")
    t.add_row("[bold]all[/bold]", str(len(items)), f"[bold]{run.accuracy:.1%}[/bold]")
    console.print(t)
    console.print(f"wrote {path}")


@factual_app.command("compare")
def factual_compare(
    baseline: str = typer.Argument(..., help="Baseline run JSON (from `preflab factual run`)."),
    candidate: str = typer.Argument(..., help="Candidate run JSON on the same suite."),
    alpha: float = typer.Option(0.05, help="Significance level for a regression."),
    out: str = typer.Option(None, help="Write the comparison JSON here."),
) -> None:
    """Paired comparison with McNemar's exact test, overall and per topic."""
    import json

    from rich.table import Table

    from preflab.evaluate.factual import SuiteRun, compare_runs

    try:
        cmp = compare_runs(SuiteRun.load(baseline), SuiteRun.load(candidate), alpha=alpha)
    except (ValueError, OSError, KeyError) as e:
        _fail(e)
    t = Table(title="factual: candidate vs baseline (McNemar exact)")
    for c in ("topic", "n", "baseline", "candidate", "lost", "gained", "p (differ)", "p (worse)", "regression"):
        t.add_column(c)
    for name, d in [*cmp.by_topic.items(), ("all", cmp.to_dict())]:
        t.add_row(name, str(d["n"]), f"{d['accuracy_baseline']:.1%}", f"{d['accuracy_candidate']:.1%}",
                  str(d["only_baseline"]), str(d["only_candidate"]), f"{d['p_value']:.3g}",
                  f"{d['p_regression']:.3g}", "[red]yes[/red]" if d["regression"] else "no")
    console.print(t)
    if out:
        from pathlib import Path

        Path(out).write_text(json.dumps(cmp.to_dict(), indent=2) + "\n")
        console.print(f"wrote {out}")


@ab_app.command("create")
def ab_create(
    candidate: str = typer.Option(..., help="Candidate model directory."),
    baseline: str = typer.Option(..., help="Baseline model directory."),
    name: str = typer.Option(..., help="Round name (shown to raters: do not name the models)."),
    n: int = typer.Option(200, min=1, help="Held-out queries."),
    queries: str = typer.Option(None, help="JSONL of {id, text, topic}; default: the sandbox's held-out queries."),
    overlap: int = typer.Option(1, min=1, help="Raters per pair."),
    temperature: float = typer.Option(1.0, min=0.0, help="Sampling temperature (0 = greedy)."),
    max_new_tokens: int = typer.Option(64, min=1, help="Longest response."),
    seed: int = typer.Option(0, help="Seed for queries, sampling and sides."),
    db: str = _DB_OPT,
    project: str = typer.Option("default", help="Project."),
    prompt_format: str = _PROMPT_FORMAT_OPT,
    threads: int = _THREADS_OPT,
) -> None:
    """Generate both checkpoints' responses and open a blind eval round (sides random, identities hidden)."""
    _set_threads(threads)
    import json
    from pathlib import Path

    from preflab.evaluate.ab import ABConfig, ABQuery, generate_responses, store_ab_round
    from preflab.models.hf import load_policy
    from preflab.store import db as store_db
    from preflab.store import io, ops

    try:
        if queries:
            qs = []
            for where, r in io.jsonl_objects(queries):
                if not isinstance(r.get("id"), str | int) or not isinstance(r.get("text"), str) or not r["text"].strip():
                    raise ValueError(f"{where}: expected an object with 'id' and a non-empty 'text' (and optional "
                                     "'topic')")
                qs.append(ABQuery(str(r["id"]), r["text"], str(r.get("topic") or "")))
            if len(qs) < n:
                console.print(f"[yellow]note:[/yellow] {queries} holds {len(qs)} queries: the round has "
                              f"{len(qs)} pairs, not --n {n}")
            qs = qs[:n]
        else:
            from preflab.sandbox.domain import generate_queries

            qs = [ABQuery(q.id, q.text, q.topic) for q in generate_queries(n, seed=seed, split="heldout")]
            qs = list({q.id: q for q in qs}.values())
        cfg = ABConfig(n_queries=len(qs), overlap=overlap, temperature=temperature, max_new_tokens=max_new_tokens,
                       seed=seed)
        cfg.validate()
        template = _template(prompt_format)
        engine = store_db.make_engine(db, create=False)
        store_db.upgrade(engine)
        with store_db.session_scope(engine, readonly=True) as s:  # a taken name fails before the generation
            pid = ops.require_project(s, name=project)
            if ops.round_by_name(s, project_id=pid, name=name) is not None:
                raise ops.StoreError(f"--name: round {name!r} already exists in project {project!r}")
        from preflab.models.hf import weights_fingerprint

        same = Path(candidate).resolve() == Path(baseline).resolve() or (
            (fp := weights_fingerprint(candidate)) is not None and fp == weights_fingerprint(baseline))
        if same:  # before any sampling: every pair would be the same model twice
            raise ValueError(f"--baseline: {baseline} has the same weights as --candidate {candidate}: raters would "
                             "compare a model with itself")
        cand, base = load_policy(candidate), load_policy(baseline)
        # generate before the transaction: a running `preflab serve` keeps taking judgements meanwhile
        texts = [generate_responses(*m, qs, cfg, prompt_template=template) for m in (cand, base)]
        with store_db.session_scope(engine) as s:
            pid = ops.require_project(s, name=project)
            rid = store_ab_round(s, project_id=pid, name=name, queries=qs,
                                 candidate_source=str(Path(candidate).resolve()),
                                 baseline_source=str(Path(baseline).resolve()), candidate_texts=texts[0],
                                 baseline_texts=texts[1], overlap=cfg.overlap, seed=cfg.seed)
        engine.dispose()
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        _fail(e)
    console.print(f"round {rid} '{name}': {len(qs)} blind pairs, overlap {overlap}")


@ab_app.command("result")
def ab_result_cmd(
    round_id: int = typer.Argument(..., help="Eval round id."),
    db: str = _DB_OPT,
    out: str = typer.Option(None, help="JSON file (default: CANDIDATE/eval/ab.json when that directory exists)."),
) -> None:
    """Win rate (ties half), Wilson CI, sign test, n needed, length-controlled rate, per topic."""
    import json
    from pathlib import Path

    from rich.table import Table

    from preflab.evaluate.ab import ab_result_from_round, top_rater_share
    from preflab.store import db as store_db

    try:
        engine = store_db.make_engine(db, create=False)
        with store_db.session_scope(engine, readonly=True) as s:
            res = ab_result_from_round(s, round_id)
        engine.dispose()
        if res.overall.n == 0:
            raise ValueError(f"round {round_id}: no judgements yet, nothing to score (nothing written)")
    except ValueError as e:
        _fail(e)
    t = Table(title=f"A/B round {round_id}: {res.candidate} vs {res.baseline}")
    for c in ("topic", "n", "wins", "losses", "ties", "win rate", "95% CI", "sign p"):
        t.add_column(c)
    for name, w in [*res.by_topic.items(), ("all", res.overall)]:
        t.add_row(name, str(w.n), str(w.wins), str(w.losses), str(w.ties), f"{w.rate:.1%}",
                  f"[{w.ci_low:.1%}, {w.ci_high:.1%}]", f"{w.p_value:.3g}")
    console.print(t)
    lc = res.length_controlled
    console.print(f"length-controlled win rate {lc.rate:.1%} [{lc.ci_low:.1%}, {lc.ci_high:.1%}]; "
                  f"n needed to tell {res.overall.rate:.1%} from 50%: {res.overall.n_needed}")
    rnd = res.round or {}
    if rnd.get("status") == "open" and rnd.get("pairs_judged", 0) < rnd.get("n_pairs", 0):
        console.print(f"[yellow]warning:[/yellow] round {round_id} is open with {rnd['pairs_judged']} of "
                      f"{rnd['n_pairs']} pairs judged: a result read while it runs (and acted on when it looks "
                      "good) overstates the evidence; close the round first (the win-rate gate refuses it)")
    sides = rnd.get("sides")
    if sides and sides["n"]:
        console.print(f"screen sides: the candidate was on the left in {sides['candidate_left']} of {sides['n']} "
                      f"showings; raters picked the left answer in {sides['left_picks']} of {sides['decided']} "
                      f"decided (p {sides['p_left']:.2g} against 1/2)")
        if sides["p_left"] < 0.001:
            console.print("[yellow]warning:[/yellow] the raters favour one screen side: with the candidate on the "
                          "left in a share other than half of the showings, that moves the win rate; check the "
                          "raters' side preference (`preflab quality status`)")
    top = top_rater_share(res)
    if top is not None and len(rnd.get("judgements_by_rater", {})) > 1 and top[1] > 0.5:
        console.print(f"[yellow]warning:[/yellow] {escape(top[0])} made {top[1]:.0%} of the judgements: the interval "
                      "treats them as independent, so it reads one person's taste as a population's")
    elif top is not None and len(rnd.get("judgements_by_rater", {})) == 1:
        console.print(f"[yellow]warning:[/yellow] one rater ({escape(top[0])}) made every judgement: the win rate is "
                      "one person's preference")
    target = Path(out) if out else (Path(res.candidate) / "eval" / "ab.json" if Path(res.candidate).is_dir() else None)
    if target is not None:
        if target.is_file():
            try:
                before = (json.loads(target.read_text()).get("round") or {}).get("id")
            except ValueError:
                before = None
            if before is not None and before != round_id:
                console.print(f"[yellow]note:[/yellow] replacing {target}, the result of round {before}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(res.to_dict(), indent=2) + "\n")
        console.print(f"wrote {target}")


@app.command("gates")
def gates_cmd(
    checkpoint: str = typer.Argument(..., help="Candidate model directory (evidence in CHECKPOINT/eval/)."),
    config: str = typer.Option(None, help="Project TOML with a \\[gates] table."),
    baseline: str = typer.Option(None, help="Collect evidence first: baseline model directory."),
    suite: str = typer.Option(None, help="Collect evidence first: factual suite file."),
    reference: str = typer.Option(None, help="Reference model for the KL (usually the SFT model)."),
    max_new_tokens: int = typer.Option(64, min=1, help="Longest response when collecting."),
    seed: int = typer.Option(0, help="Seed when collecting."),
    detector_samples: int = typer.Option(None, min=1, show_default=False,
                                         help="Answers sampled per suite item for the detectors and the "
                                              "confident-wrong gates (more: tighter CIs on a topic with few "
                                              "items). Default: EvidenceConfig's, 4."),
    prompt_format: str = _PROMPT_FORMAT_OPT,
    eval_dir_opt: str = typer.Option(None, "--eval-dir", help="The evidence, where it is not CHECKPOINT/eval/ (the "
                                                              "demo's: RUN/ppo_v2/gates)."),
    threads: int = _THREADS_OPT,
) -> None:
    """Evaluate the promotion gates on a checkpoint (optionally collecting the evidence first)."""
    _set_threads(threads)
    from pathlib import Path

    from rich.markup import escape

    from preflab.evaluate.gates import (
        Evidence,
        EvidenceConfig,
        collect_evidence,
        evaluate_gates,
        render_table,
    )

    try:
        cfg = _gates_cfg(config)
        if not Path(checkpoint).is_dir():
            raise ValueError(f"CHECKPOINT: no such model directory {checkpoint}")
        eval_dir = Path(eval_dir_opt) if eval_dir_opt else Path(checkpoint) / "eval"
        if (baseline is None) != (suite is None):
            raise ValueError("give --baseline and --suite together to collect evidence")
        if reference is not None and baseline is None:
            raise ValueError("--reference: only used when collecting evidence (with --baseline and --suite)")
        if baseline is not None:
            import hashlib

            from preflab.evaluate.factual import load_suite
            from preflab.models.hf import load_policy, weights_fingerprint

            mine = weights_fingerprint(checkpoint)
            theirs = {flag: weights_fingerprint(other) for flag, other in (("--baseline", baseline),
                                                                            ("--reference", reference)) if other}
            for flag, other in (("--baseline", baseline), ("--reference", reference)):
                if other is not None and (Path(other).resolve() == Path(checkpoint).resolve()
                                          or (mine is not None and theirs[flag] == mine)):
                    raise ValueError(f"{flag}: {other} is the candidate itself (same weights): every comparison "
                                     "would come out even")
            items = load_suite(suite)
            ev = collect_evidence(load_policy(checkpoint), load_policy(baseline), items,
                                  reference=load_policy(reference) if reference else None,
                                  cfg=EvidenceConfig(max_new_tokens=max_new_tokens, seed=seed,
                                                     prompt_template=_template(prompt_format),
                                                     **({"detector_samples": detector_samples} if detector_samples
                                                        else {})), out_dir=eval_dir,
                                  progress=True)
            ev.provenance = {"candidate": _abs(checkpoint), "candidate_weights": mine, "baseline": _abs(baseline),
                             "baseline_weights": theirs["--baseline"],
                             "reference": _abs(reference) if reference else None, "suite": _abs(suite),
                             "suite_sha256": hashlib.sha256(Path(suite).read_bytes()).hexdigest()[:16],
                             "items": len(items)}
            ev.save(eval_dir)
        report = evaluate_gates(cfg, Evidence.load(eval_dir), subject=checkpoint, checkpoint=checkpoint)
    except (ValueError, OSError) as e:
        _fail(e)
    report.save(eval_dir / "gate.json")
    console.print(render_table(report))
    if not report.passed:
        console.print(f"[red]failed:[/red] {escape(', '.join(report.failed))}")
        raise typer.Exit(1)
    console.print("[green]all gates pass[/green]")


@app.command("promote")
def promote_cmd(
    checkpoint: str = typer.Argument(..., help="Model directory to promote (evidence in CHECKPOINT/eval/)."),
    to: str = typer.Option(..., "--to", help="Stage: staging or production."),
    config: str = typer.Option(None, help="Project TOML with a \\[gates] table."),
    db: str = _DB_OPT,
    project: str = typer.Option("default", help="Project."),
    eval_dir: str = typer.Option(None, "--eval-dir", help="The evidence, where it is not CHECKPOINT/eval/ (the "
                                                          "demo's: RUN/ppo_v2/gates)."),
) -> None:
    """Promote only if every gate passes; the decision is recorded either way. Exit 1 when refused."""
    from rich.markup import escape

    from preflab.evaluate.gates import render_table
    from preflab.evaluate.promote import promote_checkpoint
    from preflab.store import db as store_db
    from preflab.store import ops

    try:
        engine = store_db.make_engine(db, create=False)  # a mistyped --db or --project records the decision nowhere new
        try:
            with store_db.session_scope(engine, readonly=True) as s:
                if ops.list_projects(s):  # a store's first project may be made by its first promotion
                    ops.require_project(s, name=project)
        finally:
            engine.dispose()
        d = promote_checkpoint(checkpoint, stage=to, db_url=db, project=project, gates=_gates_cfg(config),
                               eval_dir=eval_dir)
    except ValueError as e:
        _fail(e)
    console.print(render_table(d.report))
    for n in d.notes:
        console.print(f"[yellow]note:[/yellow] {escape(n)}")
    if not d.promoted:
        console.print(f"[red]refused:[/red] {escape(checkpoint)} not promoted to {to}; "
                      f"failed: {escape(', '.join(d.report.failed))} "
                      f"(decision recorded, event {d.event_id})")
        raise typer.Exit(1)
    console.print(f"[green]promoted[/green] {checkpoint} to {to} (event {d.event_id})")


@app.command("decisions")
def decisions_cmd(
    db: str = _DB_OPT,
    project: str = typer.Option("default", help="Project."),
) -> None:
    """What is in staging and production now, and every promotion decision (newest last)."""
    from rich.markup import escape
    from rich.table import Table

    from preflab.evaluate.promote import STAGES, decisions, promoted_to
    from preflab.store import db as store_db
    from preflab.store import ops

    try:
        engine = store_db.make_engine(db, create=False)
        with store_db.session_scope(engine, readonly=True) as s:
            pid = ops.require_project(s, name=project)
            now = {stage: promoted_to(s, project_id=pid, stage=stage) for stage in STAGES}
            rows = decisions(s, project_id=pid)
        engine.dispose()
    except ValueError as e:
        _fail(e)
    for stage, subject in now.items():
        console.print(f"{stage}: {escape(subject) if subject else '(nothing promoted yet)'}")
    t = Table(title=f"promotion decisions in {project!r}")
    for col in ("event", "when", "checkpoint", "stage", "decision", "failed gates", "notes"):
        t.add_column(col)
    for e in rows:
        p = e.payload
        t.add_row(str(e.id), f"{e.created_at:%Y-%m-%d %H:%M}", escape(e.subject), p.get("stage", ""),
                  "[green]promoted[/green]" if p.get("promoted") else "[red]refused[/red]",
                  escape(", ".join(p.get("failed", [])) or "-"), escape("; ".join(p.get("notes", [])) or "-"))
    console.print(t)


@app.command("diagnose")
def diagnose_cmd(
    checkpoint: str = typer.Argument(..., help="Model directory."),
    suite: str = typer.Option(..., help="Factual suite file."),
    n: int = typer.Option(16, min=2, help="Samples per item."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (> 0)."),
    max_new_tokens: int = typer.Option(64, min=1, help="Longest response."),
    seed: int = typer.Option(0, help="Sampler seed."),
    groups: bool = typer.Option(False, help="Also print the table per group (fact)."),
    baseline: str = typer.Option(None, help="Model directory sampled the same way (the SFT model): tells facts "
                                            "lost by optimisation from knowledge gaps."),
    out: str = typer.Option(None, help="JSON file (default CHECKPOINT/eval/diagnose.json)."),
    prompt_format: str = _PROMPT_FORMAT_OPT,
    threads: int = _THREADS_OPT,
) -> None:
    """Knowledge or preference? Sampled and greedy correctness per item and topic, never-right items
    (lost by optimisation or knowledge gaps, with --baseline), confident-wrong answers, and a verdict."""
    _set_threads(threads)
    import json
    from pathlib import Path

    from preflab.evaluate.diagnose import (
        DiagnoseConfig,
        diagnose,
        render_never_right,
        render_tables,
    )
    from preflab.evaluate.factual import load_suite
    from preflab.models.hf import load_policy

    try:
        cfg = DiagnoseConfig(n_samples=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                             prompt_template=_template(prompt_format))
        cfg.validate()
        items = load_suite(suite)
        if baseline is not None and not Path(baseline).is_dir():
            raise ValueError(f"--baseline: {baseline} is not a model directory")
        model, tok = load_policy(checkpoint)
        base = load_policy(baseline) if baseline is not None else None
        d, _ = diagnose(model, tok, items, cfg, baseline=base, baseline_name=baseline or "baseline", progress=True)
    except (ValueError, OSError) as e:
        _fail(e)
    console.print(render_tables(d))
    if groups:
        console.print(render_tables(d, groups=True))
    if any(i.right == 0 for i in d.items):
        console.print(render_never_right(d))
    console.print(f"[bold]verdict:[/bold] {escape(d.verdict)}")
    for cmd in d.fixes:
        console.print(f"[bold]re-rate:[/bold] {escape(cmd)}")
    path = Path(out) if out else Path(checkpoint) / "eval" / "diagnose.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d.to_dict(), indent=2) + "\n")
    console.print(f"wrote {path}")


# ---- rm: reward model (train/reward.py, evaluate/preference.py) -------------------------

rm_app = typer.Typer(help="Reward model: train (Bradley-Terry + margin), evaluate held-out, score responses.",
                     no_args_is_help=True)
app.add_typer(rm_app, name="rm")



def _resumed(res) -> str:  # noqa: ANN001
    return f" (resumed at step {res.resumed_from})" if getattr(res, "resumed_from", 0) else ""


def _warn_data(train, val) -> None:  # noqa: ANN001
    """Say what would make the run's numbers meaningless before training on it."""
    same = sum(e.chosen == e.rejected for e in train)
    if same:
        console.print(f"[yellow]warning:[/yellow] {same} training pairs have the same chosen and rejected text "
                      "(they teach nothing)")
    if not val:
        console.print("[yellow]warning:[/yellow] no validation pairs (too few prompts for the split): held-out "
                      "accuracy cannot be measured; add pairs or raise the validation fraction")


def _judged(examples, ties: str | None = None) -> str:
    """``N pairs``, or ``N judgements of M pairs`` where raters judged some pairs more than once; with
    ``ties`` ('exclude' / 'half', the reward config's) how many of them are ties and what became of them."""
    pairs = len({e.pair_id for e in examples})
    out = f"{len(examples)} pairs" if pairs == len(examples) else f"{len(examples)} judgements of {pairs} pairs"
    n_ties = sum(bool(e.is_tie) for e in examples)
    if ties is not None and n_ties:
        out += f", {n_ties} of them ties ({'left out of the loss' if ties == 'exclude' else 'trained toward 0.5'})"
    return out


def _store_rounds(db: str, project: str, round_kinds: tuple[str, ...]) -> list[int]:
    """The ids of the rounds ``rm train --db`` reads (for its lineage), after warning about each open
    re-rate round with pairs nobody judged yet: those pairs train on their old labels."""
    from preflab.collect.rerate import trained_round_ids, unfinished_rerates
    from preflab.store import db as store_db
    from preflab.store import ops

    engine = store_db.make_engine(db, create=False)
    try:
        with store_db.session_scope(engine, readonly=True) as s:
            pid = ops.require_project(s, name=project, where=db)
            waiting = unfinished_rerates(s, project_id=pid) if "rerate" in round_kinds else []
            ids = trained_round_ids(s, project_id=pid, round_kinds=round_kinds)
    finally:
        engine.dispose()
    for o in waiting:
        console.print(f"[yellow]warning:[/yellow] re-rate round {o.round_id} ({o.name}, guideline {o.guideline}) is "
                      f"open with {o.judged} of {o.total} pairs judged: the other {o.total - o.judged} train on their "
                      "old labels, made under an older guideline; finish the round and train again for the new ones")
    return ids


@rm_app.command("train")
def rm_train(
    out: str = typer.Option(..., "--out", help="Run directory (config.json, metrics.jsonl, ckpt/, model/)."),
    policy: str = typer.Option(None, "--policy", help="HF dir the reward model starts from (a policy or a reward model)."),
    db: str = typer.Option(None, "--db", help="Store URL; with --project, train on its latest judgements."),
    project: str = typer.Option(None, "--project", help="Project name in the store."),
    data: str = typer.Option(None, "--data", help="Instead of the store: JSONL with prompt, chosen, rejected and optional margin."),
    rounds: str = typer.Option(None, "--rounds", help=ROUNDS_HELP),
    config: str = typer.Option(None, "--config", help="TOML file; its \\[rm] table sets RewardConfig fields."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's last checkpoint."),
    lr: float = typer.Option(None, help="RewardConfig.lr"),
    batch_size: int = typer.Option(None, help="RewardConfig.batch_size (pairs per optimizer step)"),
    grad_accum: int = typer.Option(None, help="RewardConfig.grad_accum"),
    epochs: int = typer.Option(None, help="RewardConfig.epochs"),
    margin: str = typer.Option(None, help="RewardConfig.margin: none | llama2_small | llama2_large | constant"),
    ties: str = typer.Option(None, help="RewardConfig.ties: exclude | half"),
    mixed_precision: str = typer.Option(None, help="RewardConfig.mixed_precision: no | fp16 | bf16"),
    seed: int = typer.Option(None, help="RewardConfig.seed"),
    threads: int = _THREADS_OPT,
) -> None:
    """Train a reward model on judged pairs (split by prompt into train/validation)."""
    _set_threads(threads)
    from preflab.config import resolve
    from preflab.train.checkpoint import refuse_to_overwrite
    from preflab.train.data import load_jsonl, load_store_examples, split_by_prompt
    from preflab.train.reward import RewardConfig, initial_reward_model, train_reward

    try:
        if (data is None) == (db is None):
            raise ValueError("give either --db URL --project NAME or --data file.jsonl")
        if policy is None:
            raise ValueError("--policy: the HF directory to start from is required")
        cfg = resolve(RewardConfig, config, "rm", dict(lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                                                       epochs=epochs, margin=margin, ties=ties,
                                                       mixed_precision=mixed_precision, seed=seed))
        refuse_to_overwrite(out, resume=resume)  # before loading anything
        _resumable(out, resume)
        round_ids = None
        if data is not None:
            examples = load_jsonl(data)
        else:
            if not project:
                raise ValueError("--project: required with --db")
            examples = load_store_examples(db, project=project, round_kinds=_rounds(rounds))
            round_ids = _store_rounds(db, project, _rounds(rounds))
        train, val = split_by_prompt(examples, val_fraction=cfg.val_fraction, seed=cfg.seed)
        _warn_data(train, val)
        model, tok = initial_reward_model(policy, seed=cfg.seed)
        res = train_reward(cfg, model=model, tokenizer=tok, train=train, val=val, run_dir=out, resume=resume,
                           inputs={"initialised_from": _abs(policy)})
        if not _main_process():  # under `accelerate launch`: the first process records and reports
            return
        _record_lineage(db, project, out, trained_on_judgements=True, round_kinds=_rounds(rounds),
                        initialised_from=_abs(policy),
                        model_dir=_abs(res.model_dir), round_ids=round_ids)
    except (ValueError, OSError) as e:
        _fail(e)
    m = res.metrics
    console.print(f"trained {res.steps} steps{_resumed(res)} on {_judged(train, cfg.ties)} ({_judged(val)} held out); "
                  f"val accuracy {m.get('eval/accuracy', float('nan')):.3f}; model in {res.model_dir}")
    console.print(f"next: preflab rm eval {out}" + (f" --db {db} --project {project}" if db else " --ceiling C")
                  + "  (held-out accuracy against the raters' duplicate ceiling)")


@rm_app.command("eval")
def rm_eval(
    run_dir: str = typer.Argument(..., help="Run directory written by `rm train`."),
    ceiling: float = typer.Option(None, help="Accuracy ceiling from the raters' duplicate consistency."),
    db: str = typer.Option(None, "--db", help="Store URL: compute the ceiling from its planted duplicates."),
    project: str = typer.Option(None, "--project", help="Project name in the store (with --db)."),
    n_boot: int = typer.Option(1000, min=50, help="Bootstrap replicates for the CIs."),
    threads: int = _THREADS_OPT,
) -> None:
    """Held-out accuracy (overall, per rater/topic/strength, with CIs), calibration, length bias, warnings."""
    _set_threads(threads)
    from rich.table import Table

    from preflab.evaluate.preference import evaluate_run, store_ceiling

    found = None
    try:
        if ceiling is None and db is not None:
            if not project:
                raise ValueError("--project: required with --db")
            found = store_ceiling(db, project=project)
            ceiling = found.ceiling if found else None
        rep = evaluate_run(run_dir, ceiling=ceiling, n_boot=n_boot)
    except (ValueError, OSError) as e:
        _fail(e)
    a = rep.accuracy
    source = (f" (from {found.n} planted duplicates, 95% CI {found.ceiling_low:.1%}-{found.ceiling_high:.1%})"
              if found else "")
    console.print(f"held-out accuracy {a.value:.1%} (95% CI {a.low:.1%}-{a.high:.1%}, n={a.n}, ties {rep.n_ties})"
                  + (f"   ceiling {rep.ceiling:.1%}{source}" if rep.ceiling is not None else
                     "   ceiling: unknown (--db/--project: from the store's planted duplicates; or --ceiling)"))
    if found and found.n < MIN_CEILING_DUPLICATES:
        console.print(f"[yellow]warning:[/yellow] the ceiling rests on only {found.n} planted duplicates: too few "
                      "to judge the model against (plant more: the round's duplicate rate)")
    for title, groups in (("rater", rep.per_rater), ("topic", rep.per_topic), ("strength", rep.per_strength)):
        t = Table(title=f"accuracy by {title}")
        for col in (title, "n", "accuracy", "95% CI"):
            t.add_column(col)
        for k, g in groups.items():
            t.add_row(k, str(g.n), f"{g.value:.1%}", f"{g.low:.1%}-{g.high:.1%}")
        console.print(t)
    mono = {True: "yes (clearer preferences are predicted more often, as they should be)",
            False: "no (accuracy does not rise with the raters' stated strength: look at the strength table's CIs; "
                   "with few pairs per strength this is noise, with many the model misses what raters find clear)",
            None: "n/a (fewer than two strengths)"}[rep.strength_monotonic]
    console.print(f"ECE {rep.ece:.3f}   corr(reward, length) {rep.length_corr:+.2f}   "
                  f"corr(gap, length gap) {rep.length_gap_corr:+.2f}")
    console.print(f"accuracy rises with strength: {mono}")
    for w in rep.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print(f"wrote {run_dir}/eval/preference.json")


@rm_app.command("curve")
def rm_curve(
    out: str = typer.Option(..., "--out", help="Run directory: n_<pairs>/ per size, curve.json, curve.png."),
    policy: str = typer.Option(None, "--policy", help="HF dir every reward model starts from (as `rm train`)."),
    db: str = typer.Option(None, "--db", help="Store URL; with --project, its latest judgements (and the ceiling "
                                              "from its planted duplicates)."),
    project: str = typer.Option(None, "--project", help="Project name in the store."),
    data: str = typer.Option(None, "--data", help="Instead of the store: JSONL with prompt, chosen, rejected."),
    rounds: str = typer.Option(None, "--rounds", help=ROUNDS_HELP),
    sizes: str = typer.Option(None, "--sizes", help="Comma-separated training-set sizes, ascending: shares of the "
                                                    "training split (<= 1) or pair counts (default 0.125,0.25,0.5,1)."),
    ceiling: float = typer.Option(None, "--ceiling", help="Accuracy ceiling (default: from --db's duplicates)."),
    within: float = typer.Option(None, "--within", help="CurveConfig.within: the projection aims at ceiling - this "
                                                        "(default 0.03)."),
    config: str = typer.Option(None, "--config", help="TOML file; its \\[rm] table sets RewardConfig fields, "
                                                      "its \\[curve] table CurveConfig fields."),
    lr: float = typer.Option(None, help="RewardConfig.lr"),
    batch_size: int = typer.Option(None, help="RewardConfig.batch_size"),
    epochs: int = typer.Option(None, help="RewardConfig.epochs"),
    margin: str = typer.Option(None, help="RewardConfig.margin"),
    seed: int = typer.Option(None, help="RewardConfig.seed (the validation split and training) and CurveConfig.seed"),
    progress: bool = typer.Option(True, help="Show the trainer's progress bars."),
    threads: int = _THREADS_OPT,
) -> None:
    """Would more judgements help? Reward models on nested shares of the training pairs, each scored on the same
    validation pairs: accuracy per size, paired gains, gain per doubling, and the pairs projected to near the ceiling."""
    _set_threads(threads)
    from preflab.config import resolve
    from preflab.evaluate.curve import CurveConfig, describe, learning_curve
    from preflab.evaluate.preference import store_ceiling
    from preflab.train.data import load_jsonl, load_store_examples, split_by_prompt
    from preflab.train.reward import RewardConfig

    try:
        if (data is None) == (db is None):
            raise ValueError("give either --db URL --project NAME or --data file.jsonl")
        if policy is None:
            raise ValueError("--policy: the HF directory to start from is required")
        if db is not None and not project:
            raise ValueError("--project: required with --db")
        size_list = None
        if sizes is not None:
            try:
                size_list = [float(x) for x in sizes.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"--sizes: expected comma-separated numbers, got {sizes!r}") from None
        from preflab.config import toml_table

        rm_cfg = resolve(RewardConfig, config, "rm", dict(lr=lr, batch_size=batch_size, epochs=epochs, margin=margin,
                                                          seed=seed))
        cfg = resolve(CurveConfig, config, "curve", dict(sizes=size_list, within=within, seed=seed))
        if seed is None and config is not None and "seed" not in toml_table(config, "curve"):
            cfg.seed = rm_cfg.seed  # as documented: the curve's split and subsets follow the [rm] seed
        examples = (load_jsonl(data) if data is not None
                    else load_store_examples(db, project=project, round_kinds=_rounds(rounds)))
        if ceiling is None and db is not None:
            found = store_ceiling(db, project=project)
            ceiling = found.ceiling if found else None
        train, val = split_by_prompt(examples, val_fraction=rm_cfg.val_fraction, seed=rm_cfg.seed)
        if not val:
            raise ValueError(f"no validation pairs to score the curve on ({len({e.prompt for e in examples})} prompts, "
                             f"RewardConfig.val_fraction {rm_cfg.val_fraction}): more pairs, or a larger val_fraction")
        console.print(f"learning curve: {len(train):,} training pairs, {len(val):,} validation pairs"
                      + (f", ceiling {ceiling:.1%}" if ceiling is not None else ", ceiling unknown"))
        curve = learning_curve(cfg, rm_cfg, start_from=policy, train=train, val=val, run_dir=out, ceiling=ceiling,
                               show_progress=progress, log=lambda m: console.print(m, markup=False, highlight=False))
    except (ValueError, OSError) as e:
        _fail(e)
    from rich.table import Table

    t = Table(title="reward-model learning curve (held-out accuracy on the same validation pairs)")
    for col in ("pairs", "steps", "accuracy", "95% CI"):
        t.add_column(col)
    for p in curve["points"]:
        t.add_row(f"{p['pairs']:,}", "-" if p["steps"] is None else str(p["steps"]), f"{p['accuracy']:.1%}",
                  f"{p['ci'][0]:.1%}-{p['ci'][1]:.1%}")
    console.print(t)
    for line in describe(curve):
        console.print(line, markup=False, highlight=False)
    console.print(f"wrote {out}/curve.json and {out}/curve.png")


@rm_app.command("score")
def rm_score(
    model: str = typer.Option(..., "--model", help="Reward-model HF dir (e.g. RUN_DIR/model)."),
    input: str = typer.Option(..., "--input", help="JSONL with prompt/response per line."),
    output: str = typer.Option(None, "--output", help="JSONL out (default: stdout): each row plus 'score'."),
    prompt_format: str = typer.Option(None, show_default=False,
                                      help="dialogue (format_prompt) | raw | chat (the model's chat template). "
                                           "Default: the format the model was trained with (its preflab.json)."),
    max_length: int = typer.Option(None, min=8, show_default=False,
                                   help="Longest prompt + response in tokens. Default: the length the model was "
                                        "trained with (its preflab.json; 256 when it says nothing)."),
    batch_size: int = typer.Option(32, min=1, help="Responses per forward pass."),
    threads: int = _THREADS_OPT,
) -> None:
    """Score prompt/response pairs with a reward model."""
    _set_threads(threads)
    import json
    from pathlib import Path

    from preflab.models.hf import load_reward_model
    from preflab.pipeline import trained_max_length, trained_prompt_format
    from preflab.store import io
    from preflab.train.reward import score_responses

    try:
        prompt_format = prompt_format or trained_prompt_format(model)
        max_length = max_length or trained_max_length(model)
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)  # before the scoring, not after it
        rows = []
        for where, row in io.jsonl_objects(input):
            if not all(isinstance(row.get(k), str) for k in ("prompt", "response")):
                raise ValueError(f"{where}: expected an object with string fields 'prompt' and 'response'")
            rows.append(row)
        rm, tok = load_reward_model(model)
        scores = score_responses(rm, tok, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                 batch_size=batch_size, prompt_format=prompt_format, max_length=max_length)
    except (ValueError, OSError) as e:
        _fail(e)
    text = "".join(json.dumps({**r, "score": s}) + "\n" for r, s in zip(rows, scores, strict=True))
    if output:
        Path(output).write_text(text)
        console.print(f"scored {len(rows)} responses -> {output}")
    else:
        sys.stdout.write(text)


guidelines_app = typer.Typer(help="Guideline versions and rubric items (the fix loop).", no_args_is_help=True)
app.add_typer(guidelines_app, name="guidelines")


@guidelines_app.command("add-rubric")
def guidelines_add_rubric(
    label: str = typer.Option(..., help="Label of the new guideline version, e.g. v2."),
    item: list[str] = typer.Option(..., help="A rubric item (repeat for several)."),
    db: str = _DB_OPT,
    project: str = typer.Option("default", help="Project."),
) -> None:
    """Create a new guideline version: the newest one's text and rubric plus the given items."""
    from preflab.collect.rerate import add_rubric
    from preflab.store import db as store_db
    from preflab.store import ops

    engine = store_db.make_engine(db, create=False)
    try:
        with store_db.session_scope(engine) as s:
            pid = ops.require_project(s, name=project)
            add_rubric(s, project_id=pid, label=label, items=item)
            g = ops.latest_guideline(s, project_id=pid)
    except ValueError as e:
        _fail(e)
    console.print(f"guideline {g.label}: {len(g.rubric)} rubric items")
    for r in g.rubric:
        console.print(f"  - {r}")


@guidelines_app.command("list")
def guidelines_list(
    db: str = _DB_OPT,
    project: str = typer.Option("default", help="Project."),
) -> None:
    """List guideline versions with their rubric items."""
    from preflab.store import db as store_db
    from preflab.store import ops

    engine = store_db.make_engine(db, create=False)
    try:
        with store_db.session_scope(engine, readonly=True) as s:
            gs = ops.list_guidelines(s, project_id=ops.require_project(s, name=project))
    except ValueError as e:
        _fail(e)
    for g in gs:
        console.print(f"[bold]{g.label}[/bold] ({g.created_at:%Y-%m-%d}): {'; '.join(g.rubric) or '(no rubric)'}")


def _rerate_flag(e: Exception) -> ValueError:
    """A re-rate error named as the user typed it: --name, not round.name; --limit, not rerate.limit."""
    import re

    return ValueError(re.sub(r"^(?:rerate|round)\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e)))


@app.command("rerate")
def rerate_cmd(
    where: list[str] = typer.Option([], help="Filter KEY=VALUE (topic, round_kind, source); repeatable. Without "
                                             "round_kind=: pairs judged in collection or re-rate rounds."),
    limit: int = typer.Option(800, min=1, help="Most pairs to re-rate (a seeded random sample of the matching ones)."),
    guideline: str = typer.Option(..., help="Guideline version the re-rate round uses, e.g. v2."),
    name: str = typer.Option(None, help="Round name (default rerate-<guideline>[-<where values>], numbered if taken)."),
    overlap: int = typer.Option(1, min=1, help="Raters per pair."),
    duplicate_rate: float = typer.Option(0.1, help="Share of judged items planted again, sides swapped (as a "
                                                   "collection round's): raters' self-consistency under the rubric."),
    include_rerated: bool = typer.Option(False, "--include-rerated", help="Also select pairs already judged under "
                                         "--guideline (pays for their labels again)."),
    seed: int = typer.Option(0, help="Seed of the selection."),
    db: str = _DB_OPT,
    project: str = typer.Option("default", help="Project."),
) -> None:
    """Open a re-rate round over judged pairs matching --where, under a newer guideline."""
    from preflab.collect.rerate import create_rerate_round, parse_where
    from preflab.store import db as store_db
    from preflab.store import ops

    engine = store_db.make_engine(db, create=False)
    try:
        with store_db.session_scope(engine) as s:
            pid = ops.require_project(s, name=project)
            rr = create_rerate_round(s, project_id=pid, name=name, where=parse_where(where), limit=limit,
                                     guideline=guideline, overlap=overlap, seed=seed, duplicate_rate=duplicate_rate,
                                     include_rerated=include_rerated)
    except ValueError as e:
        _fail(_rerate_flag(e))
    console.print(f"re-rate round {rr.round_id} ({rr.name}): {rr.n_pairs} of {rr.matched} matching pairs under "
                  f"guideline {rr.guideline}")
    if rr.skipped:
        console.print(f"skipped {rr.skipped} matching pairs already judged under {rr.guideline} "
                      "(--include-rerated selects them again)")
    if rr.queued:
        console.print(f"skipped {rr.queued} matching pairs waiting in an open round under {rr.guideline}")
    if rr.n_pairs < rr.matched:
        rest = rr.matched - rr.n_pairs
        console.print(f"[yellow]truncated at --limit {limit}:[/yellow] kept a random sample (seeded shuffle, --seed "
                      f"{rr.seed}); the other {rest} are not queued: run the same rerate again for a second round "
                      f"(it skips the pairs queued here; another --name if you gave one); --limit {rr.matched} would have "
                      "taken them all")


@app.command("lineage")
def lineage_cmd(
    db: str = _DB_OPT,
    project: str = typer.Option("default", help="Project."),
) -> None:
    """Show which judgements, guideline, reward model and policy each run came from."""
    from rich.table import Table

    from preflab.collect.rerate import lineage
    from preflab.store import db as store_db
    from preflab.store import ops

    engine = store_db.make_engine(db, create=False)
    try:
        with store_db.session_scope(engine, readonly=True) as s:
            rows = lineage(s, project_id=ops.require_project(s, name=project))
    except ValueError as e:
        _fail(e)
    t = Table()
    t.add_column("run", overflow="fold")  # paths: every character matters, fold rather than cut
    t.add_column("from", overflow="fold")
    for r in rows:
        t.add_row(r["run"], _lineage_from(r))
    console.print(t)


def _lineage_from(row: dict) -> str:
    """One lineage row's sources: ``key=value``s, the reward model as the run it links to, and the rounds
    trained on by id, name, kind and guideline."""
    hidden = ("run", "at", "round_ids", "trained_rounds", "reward_model_run")
    parts = [f"{k}={row['reward_model_run'] if k == 'reward_model' and 'reward_model_run' in row else v}"
             for k, v in row.items() if k not in hidden]
    rounds = row.get("trained_rounds")
    if rounds:
        parts.append("trained on rounds " + "; ".join(
            f"{x['id']} {x['name']} ({x['kind']}, {x['guideline']})" for x in rounds))
    return ", ".join(parts)


# ---- quality: agreement report, rater status, calibration workshop (quality/, collect/workshop.py) ----

quality_app = typer.Typer(help="Rater quality: a round's agreement, calibration workshop report, disagreement "
                               "review, rater status, drift alerts.",
                          no_args_is_help=True)
app.add_typer(quality_app, name="quality")


def _quality_embedder(embed: str):
    from preflab.quality import drift

    if embed == "tfidf":
        return drift.tfidf_embed
    if embed == "minilm":
        return drift.minilm_embed
    if embed == "auto":
        return drift.default_embedder()
    raise typer.BadParameter(f"--embed: must be auto, minilm or tfidf, got {embed!r}")


@quality_app.command("report")
def quality_report(
    out: str = typer.Option(..., "--out", help="Directory for workshop_report.{json,md} and style_guide.md."),
    db: str = _DB_OPT,
    project: str = typer.Option("default", help="Project."),
    before: str = typer.Option(None, help="The round before the workshop, name or id (default: the first "
                                          "calibration round)."),
    after: str = typer.Option(None, help="The round after, name or id (default: the last calibration round)."),
    n_boot: int = typer.Option(1000, min=10, help="Bootstrap replicates for the CIs."),
    seed: int = typer.Option(0, min=0, help="Bootstrap seed."),
    embed: str = typer.Option("tfidf", help="Rationale embedding for the style guide: auto, minilm or tfidf."),
) -> None:
    """Write the calibration workshop's before/after report and the style guide."""
    from preflab.collect.workshop import WorkshopConfig, write_workshop_report
    from preflab.store import db as store_db
    from preflab.store import ops

    embedder = _quality_embedder(embed)
    try:
        engine = store_db.make_engine(db, create=False)
        with store_db.session_scope(engine) as s:
            pid = ops.require_project(s, name=project)
            ids = {}
            for flag, ref in (("--before", before), ("--after", after)):
                ids[flag] = None if ref is None else _round_ref(s, project, ref, flag=flag).id
            rep, paths = write_workshop_report(s, project_id=pid, out_dir=out, before_round_id=ids["--before"],
                                               after_round_id=ids["--after"],
                                               cfg=WorkshopConfig(n_boot=n_boot, seed=seed), embed=embedder)
        engine.dispose()
    except (ValueError, OSError) as e:
        _fail(e)
    _print_workshop(rep)
    for p in paths.values():
        console.print(f"wrote {p}")


@quality_app.command("review")
def quality_review(
    round_ref: str = typer.Argument(..., metavar="ROUND", help="The calibration round: its name or id."),
    db: str = _DB_OPT,
    project: str = typer.Option("default", help="Project."),
    limit: int = typer.Option(15, min=1, help="Most split items to show and write."),
    out: str = typer.Option(None, "--out", help="Also write them, with every side's rationales, as Markdown here "
                                                "(for the discussion)."),
) -> None:
    """The most split items of a round, for the workshop's discussion before the next guideline version."""
    from pathlib import Path

    from rich.table import Table

    from preflab.collect.workshop import disagreement_review, review_markdown
    from preflab.store import db as store_db

    try:
        engine = store_db.make_engine(db, create=False)
        with store_db.session_scope(engine, readonly=True) as s:
            rnd = _round_ref(s, project, round_ref)
            if rnd.overlap < 2:
                raise ValueError(f"ROUND: {rnd.name!r} has overlap 1: each item went to one rater, so no item "
                                 "is split (raters' consistency comes from planted duplicates: preflab quality status)")
            items = disagreement_review(s, round_id=rnd.id)
        engine.dispose()
        if not items:
            raise ValueError(f"ROUND: {rnd.name!r} has no judgements yet")
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(review_markdown(items, limit=limit))
    except (ValueError, OSError) as e:
        _fail(e)
    t = Table(title=f"{rnd.name}: the {min(limit, len(items))} most split of {len(items)} items")
    for col in ("pair", "a / b / tie", "largest camp", "query"):
        t.add_column(col)
    for it in items[:limit]:
        c = it.counts
        t.add_row(it.pair_id, f"{c.get('a', 0)} / {c.get('b', 0)} / {c.get('tie', 0)}", f"{it.majority_share:.0%}",
                  it.prompt_text if len(it.prompt_text) <= 60 else it.prompt_text[:57] + "...")
    console.print(t)
    if out:
        console.print(f"wrote {out} (each side's rationales, in the raters' words)")


def _round_ref(s, project: str, ref: str, *, flag: str = "ROUND"):  # noqa: ANN001, ANN202
    """The round of ``project`` named ``ref`` (or numbered, when no round has that name); ``flag`` is
    what an error names."""
    from preflab.store import ops

    pid = ops.require_project(s, name=project)
    rnd = ops.round_by_name(s, project_id=pid, name=ref)
    if rnd is None and ref.isdigit():
        try:
            rnd = ops.get_round(s, round_id=int(ref))
        except ops.StoreError:
            rnd = None
        if rnd is not None and rnd.project_id != pid:
            rnd = None
    if rnd is None:
        raise ValueError(f"{flag}: no round named or numbered {ref!r} in project {project!r}")
    return rnd


@quality_app.command("agreement")
def quality_agreement(
    round_ref: str = typer.Argument(..., metavar="ROUND", help="A round with overlap >= 2 (any kind): name or id."),
    db: str = _DB_OPT,
    project: str = typer.Option("default", help="Project."),
    n_boot: int = typer.Option(1000, min=10, help="Bootstrap resamples of items for the CIs."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    min_shared: int = typer.Option(5, "--min-shared", min=1, help="Rater pairs sharing fewer items stay out of the "
                                                                  "mean pairwise kappa."),
    out: str = typer.Option(None, "--out", help="Also write the figures as JSON here."),
) -> None:
    """How far a round's raters agree: kappa (pairwise, Fleiss), alpha, raw agreement with 95% CIs; per rater."""
    import json as _json
    from pathlib import Path

    from rich.table import Table

    from preflab.collect.workshop import round_agreement
    from preflab.store import db as store_db

    try:
        engine = store_db.make_engine(db, create=False)
        with store_db.session_scope(engine, readonly=True) as s:
            rnd = _round_ref(s, project, round_ref)
            a = round_agreement(s, round_id=rnd.id, n_boot=n_boot, seed=seed, min_shared=min_shared)
        engine.dispose()
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(_json.dumps(a, indent=2) + "\n")
    except (ValueError, OSError) as e:
        _fail(e)
    t = Table(title=f"{rnd.name}: {a['n_items']} items judged by 2+ of {a['n_raters']} raters")
    for col in ("statistic", "value", "95% CI"):
        t.add_column(col)
    for name, st in a["statistics"].items():
        ci = f"[{st['low']:.2f}, {st['high']:.2f}]" if st.get("low") is not None else "-"
        t.add_row(name.replace("_", " "), "n/a" if st["value"] is None else f"{st['value']:.2f}", ci)
    console.print(t)
    mk = a["statistics"]["mean_pairwise_kappa"]
    undefined = f", {mk['n_pairs_undefined']} with an undefined kappa (one category only)" if mk["n_pairs_undefined"] else ""
    console.print(f"mean pairwise kappa: {mk['n_pairs']} rater pairs sharing {mk['min_shared']}+ items entered the mean; "
                  f"{mk['n_pairs_few_items']} sharing fewer left out{undefined}", highlight=False)
    if mk["value"] is None:
        console.print(f"[yellow]note:[/yellow] mean pairwise kappa n/a: {mk['reason']}", highlight=False)
    r = Table(title="per rater (lowest agreement first)")
    for col in ("rater", "agreement with the others' majority", "items compared", "mean kappa with each other"):
        r.add_column(col)
    rows = sorted(a["raters"].items(), key=lambda kv: (kv[1]["agreement_with_majority"] is None,
                                                        kv[1]["agreement_with_majority"] or 0.0))
    for name, x in rows:
        agree, k = x["agreement_with_majority"], x["mean_kappa_with_others"]
        r.add_row(name, "-" if agree is None else f"{agree:.0%}", str(x["n_compared"]), "-" if k is None else f"{k:.2f}")
    console.print(r)
    _few_items(a, rnd.name)
    if out:
        console.print(f"wrote {out}")


def _print_workshop(rep: dict) -> None:
    from rich.table import Table

    t = Table(title=f"{rep['rounds']['before']['name']} -> {rep['rounds']['after']['name']}")
    for col in ("statistic", "before [95% CI]", "after [95% CI]", "change [95% CI]"):
        t.add_column(col)
    for name, c in rep["change"].items():
        b, a = rep["before"]["statistics"][name], rep["after"]["statistics"][name]
        t.add_row(name, f"{b['value']:.2f} [{b['low']:.2f}, {b['high']:.2f}]",
                  f"{a['value']:.2f} [{a['low']:.2f}, {a['high']:.2f}]",
                  f"{c['value']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]")
    console.print(t)
    _few_items(rep["before"], rep["rounds"]["before"]["name"])
    _few_items(rep["after"], rep["rounds"]["after"]["name"])


def _few_items(stats: dict, round_name: str) -> None:
    from rich.markup import escape

    from preflab.quality.calibration import few_items_note

    if note := few_items_note(stats, round_name):
        console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False)


@quality_app.command("status")
def quality_status(
    db: str = _DB_OPT,
    project: str = typer.Option("default", help="Project."),
    check_drift: bool = typer.Option(False, "--check-drift", help="Run the drift check now and store alerts."),
    baseline: int = typer.Option(200, min=10, help="Judgements after calibration that form each rater's baseline "
                                                   "(a rater is checked once they have this many and 50 more)."),
    embed: str = typer.Option("tfidf", help="Rationale embedding for the drift check: auto, minilm or tfidf."),
) -> None:
    """Per-rater self-consistency (duplicates), agreement with the others, and open alerts."""
    from rich.markup import escape
    from rich.table import Table

    from preflab.collect.workshop import monitor_drift, rater_status
    from preflab.quality.drift import DriftConfig
    from preflab.store import db as store_db
    from preflab.store import ops

    embedder = _quality_embedder(embed)
    try:
        engine = store_db.make_engine(db, create=False)
        with store_db.session_scope(engine) as s:
            pid = ops.require_project(s, name=project)
            checks = []
            if check_drift:  # the baseline the user chose is enough baseline to check against
                checks = monitor_drift(s, project_id=pid, baseline_n=baseline, embed=embedder,
                                       cfg=DriftConfig(baseline_min=min(baseline, DriftConfig().baseline_min)))
            status = rater_status(s, project_id=pid)
            alerts = ops.list_alerts(s, project_id=pid, resolved=False)
        engine.dispose()
    except (ValueError, OSError) as e:
        _fail(e)
    t = Table(title=f"raters of {project}")
    # planted duplicates are not counted here (the admin page and `store progress` count them)
    for col in ("rater", "judgements (without planted duplicates)", "self-consistency [95% CI]", "flip rate",
                "accuracy ceiling", "agreement with majority", "picks left", "open alerts"):
        t.add_column(col)
    sided = []
    for r in status:
        c, side = r["consistency"], r["picks_left"]
        if side["n"] and side["p_value"] < 0.001:
            sided.append(f"{r['rater']} ({side['share']:.0%} of {side['n']}, p={side['p_value']:.2g})")
        t.add_row(escape(r["rater"]), str(r["judgements"]),
                  f"{c['consistency']:.2f} [{c['low']:.2f}, {c['high']:.2f}] (n={c['n']})" if c else "no duplicates",
                  f"{c['flip_rate']:.3f}" if c else "-", f"{c['ceiling']:.2f}" if c else "-",
                  f"{r['agreement_with_majority']:.2f} (n={r['agreement_n']})"
                  if r["agreement_with_majority"] is not None else "-",
                  f"{side['share']:.0%} (n={side['n']})" if side["n"] else "-", str(r["open_alerts"]))
    console.print(t)
    if sided:
        console.print(f"[yellow]position bias:[/yellow] {escape(', '.join(sided))} picked one screen side far more "
                      "than half the time; sides are random, so this is a rater clicking a side, not judging "
                      "(it also makes their duplicates disagree)")
    if check_drift:
        d = Table(title=f"drift check: each rater's last {DriftConfig().window} judgements against their first {baseline}")
        for col in ("rater", "baseline", "recent", "rationale shift p", "agreement (baseline -> recent)",
                    "agreement drop p", "result"):
            d.add_column(col)
        for c in checks:
            agr = ("-" if c.agreement_baseline is None or c.agreement_recent is None
                   else f"{c.agreement_baseline:.2f} -> {c.agreement_recent:.2f}")
            ran = not c.reason.startswith("not enough")
            d.add_row(escape(c.rater), str(c.n_baseline), str(c.n_recent), f"{c.p_rationale:.4f}" if ran else "-",
                      agr, f"{c.p_agreement:.4f}" if ran else "-",
                      f"[red]flagged[/red]: {escape(c.reason)}" if c.flagged else escape(c.reason))
        console.print(d)
    for a in alerts:
        console.print(f"[yellow]alert {a.id} ({a.kind}):[/yellow] {escape(a.message)}")
        for ex in (a.payload or {}).get("examples", []):
            console.print(f"    e.g. \"{ex}\"", markup=False)


@quality_app.command("workshop")
def quality_workshop(
    out: str = typer.Option(..., "--out", help="Directory for the review, report and style guide."),
    db: str = _DB_OPT,
    project: str = typer.Option("sandbox", help="Project (created if missing)."),
    n_pairs: int = typer.Option(50, min=2, help="Pairs per calibration round."),
    seed: int = typer.Option(0, min=0, help="Seed of the simulated raters, pairs and bootstrap."),
    n_boot: int = typer.Option(1000, min=10, help="Bootstrap replicates for the CIs."),
    rubric: str = typer.Option("v1", help="Rubric the simulated raters judge by: v1 or v2."),
) -> None:
    """Sandbox: run the calibration workshop with the five simulated senior agents through the store."""
    from preflab.collect.workshop import WorkshopConfig, sandbox_workshop
    from preflab.store import db as store_db

    if rubric not in ("v1", "v2"):
        _fail(ValueError(f"--rubric: must be v1 or v2, got {rubric!r}"))
    try:
        engine = store_db.make_engine(db)
        store_db.upgrade(engine)
        rep = sandbox_workshop(engine, project=project, out_dir=out, rubric=rubric,
                               cfg=WorkshopConfig(n_pairs=n_pairs, seed=seed, n_boot=n_boot))
        engine.dispose()
    except (ValueError, OSError) as e:
        _fail(e)
    _print_workshop(rep)
    for p in rep["paths"].values():
        console.print(f"wrote {p}")


@app.command()
def demo(
    out: str = typer.Option("runs/demo", help="Run directory (resumes what is already done there)."),
    seed: int = typer.Option(0, help="Seed of everything."),
    quick: bool = typer.Option(False, "--quick", help="The same path at toy scale (a few minutes; for CI)."),
    base: str = typer.Option("", help="Use this built sandbox base model (preflab sandbox build) instead of building."),
    threads: int = typer.Option(2, help="torch CPU threads (the numbers depend on it through float rounding; "
                                        "the documented runs use 2)."),
) -> None:
    """The whole story on the embedded sandbox: raters, reward model, PPO, gates, fix, A/B, outcomes, report."""
    from preflab.demo import DemoConfig, run_demo

    if threads != 2:
        console.print(f"[yellow]note:[/yellow] the documented numbers were measured at 2 threads; with {threads} "
                      "float rounding differs, and at toy scale (--quick) a gate can come out the other way")
    try:
        run_demo(DemoConfig(out=out, seed=seed, base_from=base, threads=threads), quick=quick, console=console)
    except (FileNotFoundError, ValueError) as e:
        _fail(e)


# ---- store (import / export / rounds) ----------------------------------------------------

store_app = typer.Typer(help="The preference store: migrate, import prompts/pairs, open rounds, export.",
                        no_args_is_help=True)
app.add_typer(store_app, name="store")
_PROJECT_OPT = typer.Option("default", help="Project (created if missing on import).")


@store_app.command("migrate")
def store_migrate(db: str = _DB_OPT) -> None:
    """Create or upgrade the store's tables (Alembic head)."""
    from preflab.store import db as store_db

    store_db.upgrade(db)
    engine = store_db.make_engine(db)
    console.print(f"store at revision {store_db.current_revision(engine)}")


@store_app.command("import")
def store_import(
    path: str = typer.Argument(..., help="JSONL file (formats: docs/store.md)."),
    kind: str = typer.Option("pairs", help="'pairs' (prompt and responses inline or by id) or 'prompts'."),
    db: str = _DB_OPT,
    project: str = _PROJECT_OPT,
) -> None:
    """Import prompts or pairs from JSONL in one transaction (a bad line imports nothing)."""
    from preflab.store import db as store_db
    from preflab.store import io, ops

    if kind not in ("pairs", "prompts"):
        _fail(ValueError(f"--kind: must be 'pairs' or 'prompts', got {kind!r}"))
    try:
        engine = store_db.make_engine(db, create=False)
    except ConfigError:  # the first import makes the store; say so (a mistyped --db would go unnoticed)
        console.print(f"[yellow]note:[/yellow] no store at {escape(db)} yet: creating a new one")
        engine = store_db.make_engine(db)
    store_db.upgrade(engine)
    try:
        with store_db.session_scope(engine) as s:
            pid = ops.ensure_project(s, name=project)
            fn = io.import_pairs if kind == "pairs" else io.import_prompts
            res = fn(s, project_id=pid, path=path)
    except ops.StoreError as e:
        _fail(e)
    console.print(f"imported {res.prompts} prompts, {res.responses} responses, {res.pairs} pairs into {project!r}")


def _as_flag(e: Exception) -> ValueError:
    """A round setting's error named as the user typed it: --duplicate-rate, not assign.duplicate_rate."""
    import re

    return ValueError(re.sub(r"^(?:assign|AssignConfig|round)\.(\w+)",
                             lambda m: "NAME" if m.group(1) == "name" else "--" + m.group(1).replace("_", "-"), str(e)))


@store_app.command("round")
def store_round(
    name: str = typer.Argument(..., help="Round name (unique in the project)."),
    kind: str = typer.Option("collection", help="calibration | collection | rerate | eval."),
    topic: str = typer.Option(None, help="Only pairs whose prompt has this topic (default: all pairs)."),
    pairs_from: str = typer.Option(None, "--pairs", help="Only the pairs listed in this JSONL (each line's \"id\"; "
                                                         "e.g. the file just imported: a new checkpoint's answers)."),
    overlap: int = typer.Option(1, min=1, help="Distinct raters per item."),
    duplicate_rate: float = typer.Option(0.1, help="Share of judged items planted again, sides swapped."),
    duplicate_gap: int = typer.Option(5, help="At least this many other tasks between an item and its duplicate."),
    fallback: str = typer.Option("always", help="Specialists may take other domains: always | after | never."),
    fallback_after_s: float = typer.Option(0.0, help="With --fallback after: seconds after the round opens."),
    routing: str = typer.Option("specialty", help="specialty (raters get their topics first) | any."),
    allow_ties: bool = typer.Option(True, "--allow-ties/--no-ties", help="Offer 'tie' as an answer."),
    min_rationale_chars: int = typer.Option(10, help="Rationale required, at least this long after trimming."),
    lease_s: float = typer.Option(900.0, help="Seconds a rater holds a task before it returns to the pool."),
    seed: int = typer.Option(0, help="Seed of order, sides and duplicates."),
    db: str = _DB_OPT,
    project: str = _PROJECT_OPT,
) -> None:
    """Open a round over the project's pairs under the newest guideline version."""
    from preflab.collect.assign import AssignConfig, open_round, round_routing_gaps
    from preflab.config import from_dict
    from preflab.store import db as store_db
    from preflab.store import ops

    try:
        cfg = from_dict(AssignConfig, {"overlap": overlap, "duplicate_rate": duplicate_rate,
                                       "duplicate_gap": duplicate_gap, "fallback": fallback,
                                       "fallback_after_s": fallback_after_s, "routing": routing,
                                       "allow_ties": allow_ties, "min_rationale_chars": min_rationale_chars,
                                       "lease_s": lease_s, "seed": seed})
        cfg.validate()
    except ValueError as e:
        _fail(_as_flag(e))
    engine = store_db.make_engine(db, create=False)
    try:
        with store_db.session_scope(engine) as s:
            pid = ops.require_project(s, name=project)
            pairs = [p.id for p in ops.list_pairs(s, project_id=pid, topic=topic)]
            if topic and not pairs:
                topics = sorted({p.topic for p in ops.list_pairs(s, project_id=pid) if p.topic})
                raise ops.StoreError(f"--topic: no pairs with topic {topic!r} in project {project!r} "
                                     f"(topics there: {', '.join(topics) or 'none'})")
            if pairs_from:
                from preflab.store.io import listed_pair_ids

                pairs = listed_pair_ids(pairs_from, stored=set(pairs),
                                        qualifier=f" with topic {topic!r}" if topic else "")
            rid = open_round(s, cfg, project_id=pid, name=name, kind=kind, pair_ids=pairs)
            gaps = round_routing_gaps(s, round_id=rid)
    except ops.StoreError as e:
        _fail(_as_flag(e))
    console.print(f"round {name!r} (id {rid}): {len(pairs)} pairs, overlap {overlap}")
    for g in gaps:
        console.print(f"[yellow]warning:[/yellow] {g}")


@store_app.command("sample")
def store_sample(
    out: str = typer.Argument(..., help="Pairs JSONL to write (the import format; then `store round NAME --pairs OUT`)."),
    policy: list[str] = typer.Option(..., "--policy", help="A model directory to sample, as DIR or LABEL=DIR (the "
                                                           "label becomes the responses' source); repeat for each."),
    topic: str = typer.Option(None, help="Only the project's prompts with this topic (default: all)."),
    limit: int = typer.Option(0, min=0, help="At most this many prompts, a seeded choice (0: all)."),
    include_eval_prompts: bool = typer.Option(False, "--include-eval-prompts",
                                              help="Also the prompts of blind A/B (eval) rounds; by default they "
                                                   "stay held out of training pairs."),
    n_per_policy: int = typer.Option(2, min=1, help="Responses sampled per prompt from each policy."),
    pairs_per_prompt: int = typer.Option(1, min=1, help="PairsConfig.pairs_per_prompt"),
    strategy: str = typer.Option("cross_source", help="PairsConfig.strategy: cross_source | random"),
    temperature: float = typer.Option(1.0, min=0.0, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    max_new_tokens: int = typer.Option(64, min=1, help="Longest response."),
    prompt_format: str = typer.Option("dialogue", help="dialogue ('User: ...\\nAssistant:') | raw | chat (each "
                                                        "policy's own chat template)"),
    seed: int = typer.Option(0, help="Seed of the prompt choice, the sampler, pair choice and sides."),
    db: str = _DB_OPT,
    project: str = typer.Option("default", help="Project (its prompts are sampled; the pairs are added to it)."),
    threads: int = _THREADS_OPT,
) -> None:
    """Sample policies on the project's prompts and add the answers as comparison pairs (fix-and-re-rate loop)."""
    _set_threads(threads)
    import functools
    import random
    from pathlib import Path

    from rich.progress import Progress

    from preflab.collect.pairs import PairsConfig, add_plan, build_pairs, sample_candidates
    from preflab.config import from_dict
    from preflab.models.hf import load_policy
    from preflab.store import db as store_db
    from preflab.store import io, ops
    from preflab.train.data import PROMPT_FORMATS, dialogue_prompt

    try:
        cfg = from_dict(PairsConfig, {"pairs_per_prompt": pairs_per_prompt, "strategy": strategy, "seed": seed})
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"--prompt-format: must be 'dialogue', 'raw' or 'chat', got {prompt_format!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"--top-p: must be in (0, 1], got {top_p}")
        dirs: dict[str, str] = {}
        for item in policy:
            label, _, path = item.partition("=") if "=" in item else (item, "", item)
            if not label or not path:
                raise ValueError(f"--policy {item!r}: expected DIR or LABEL=DIR")
            if label in dirs:
                raise ValueError(f"--policy {item!r}: label {label!r} given twice")
            dirs[label] = path
        if len(dirs) * n_per_policy < 2:
            raise ValueError("--n-per-policy: one policy with one response per prompt cannot make a pair")
        engine = store_db.make_engine(db, create=False)
        with store_db.session_scope(engine, readonly=True) as s:
            pid = ops.require_project(s, name=project)
            prompts = ops.list_prompts(s, project_id=pid, topic=topic)
            held = set() if include_eval_prompts else ops.eval_prompt_ids(s, project_id=pid)
        n_held = sum(p.id in held for p in prompts)
        prompts = [p for p in prompts if p.id not in held]
        if not prompts:
            raise ops.StoreError(f"{'--topic' if topic else '--project'}: no prompts"
                                 f"{f' with topic {topic!r}' if topic else ''} in {project!r}"
                                 + (f" besides {n_held} of blind A/B rounds (--include-eval-prompts)" if n_held
                                    else " (store import FILE --kind prompts)"))
        if n_held:
            console.print(f"left out {n_held} prompts of blind A/B rounds (held out; --include-eval-prompts to use "
                          "them)")
        if limit and limit < len(prompts):
            prompts = sorted(random.Random(f"sample:{seed}").sample(prompts, limit), key=lambda p: p.id)
        policies = {label: load_policy(path) for label, path in dirs.items()}
        formats = {label: functools.partial(dialogue_prompt, prompt_format=prompt_format, tokenizer=tok)
                   for label, (_, tok) in policies.items()}
        for label, fmt in formats.items():  # a model without a chat template fails here, before any sampling
            try:
                fmt(prompts[0].text)
            except ValueError as e:
                raise ValueError(f"--policy {label}: {e}") from None
    except (ValueError, OSError, ops.StoreError) as e:
        _fail(e)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("sampling", total=len(prompts) * n_per_policy * len(policies))
        cands = sample_candidates(policies, prompts, n_per_policy=n_per_policy, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p, seed=seed,
                                  prompt_format=formats,
                                  on_batch=lambda n: bar.advance(task, n))
    plan = build_pairs(prompts, cands, cfg)
    dropped = ", ".join(f"{k} {v}" for k, v in plan.dropped.items() if v) or "none"
    if not plan.pairs:
        _fail(ValueError(f"no pairs: no prompt got two distinct usable answers (dropped: {dropped}); "
                         "try a higher --temperature or --n-per-policy"))
    try:
        with store_db.session_scope(engine) as s:
            res = add_plan(s, project_id=pid, plan=plan)
            io.export_pairs_jsonl(s, project_id=pid, path=out, pair_ids=[p.id for p in plan.pairs])
    except (ops.StoreError, OSError) as e:
        _fail(e)
    engine.dispose()
    console.print(f"sampled {len(cands)} answers to {len(prompts)} prompts from {', '.join(dirs)}; "
                  f"{len(plan.pairs)} pairs ({res.pairs} new) in {project!r}; dropped: {dropped}")
    console.print(f"wrote {out}; to have them rated: preflab store round NAME --pairs {Path(out)} "
                  f"--db {db} --project {project}")


@store_app.command("export")
def store_export(
    what: str = typer.Argument(..., help="judgements | trl | hf | pairs."),
    out: str = typer.Argument(..., help="Output file (JSONL) or directory (hf: Dataset.save_to_disk)."),
    round_name: str = typer.Option(None, "--round", help="Only this round (judgements): its name or id."),
    margin: str = typer.Option(None, help="Strength->margin map for trl/hf, e.g. '0,0.5,1,2' (strengths 0..3)."),
    db: str = _DB_OPT,
    project: str = _PROJECT_OPT,
) -> None:
    """Export judgements, TRL prompt/chosen/rejected(/margin) records, a HF dataset or the pairs."""
    from preflab.store import db as store_db
    from preflab.store import io, ops

    engine = store_db.make_engine(db, create=False)
    try:
        margins = None
        if margin is not None:
            vals = [float(x) for x in margin.split(",")]
            if len(vals) != 4:
                raise ops.StoreError(f"--margin: need 4 values (strengths 0..3), got {len(vals)}")
            margins = dict(enumerate(vals))
        with store_db.session_scope(engine, readonly=True) as s:
            pid = ops.require_project(s, name=project)
            if what == "judgements":
                rid = None
                if round_name is not None:
                    rid = _round_ref(s, project, round_name, flag="--round").id
                n = io.export_judgements_jsonl(s, project_id=pid, path=out, round_id=rid)
            elif what == "trl":
                n = io.export_trl_jsonl(s, project_id=pid, path=out, margin=margins)
            elif what == "hf":
                ds = io.to_hf_dataset(s, project_id=pid, margin=margins)
                ds.save_to_disk(out)
                n = len(ds)
            elif what == "pairs":
                n = io.export_pairs_jsonl(s, project_id=pid, path=out)
            else:
                raise ops.StoreError(f"what: must be judgements, trl, hf or pairs, got {what!r}")
    except (ops.StoreError, ValueError) as e:
        _fail(e)
    console.print(f"wrote {n} {what} records to {out}")


@store_app.command("progress")
def store_progress(
    round_name: str = typer.Argument(..., metavar="ROUND", help="The round: its name or id."),
    db: str = _DB_OPT,
    project: str = _PROJECT_OPT,
) -> None:
    """Items completed and judgements per rater in a round."""
    from preflab.store import db as store_db
    from preflab.store import ops

    try:
        engine = store_db.make_engine(db, create=False)
        with store_db.session_scope(engine, readonly=True) as s:
            rnd = _round_ref(s, project, round_name)
            p = ops.round_progress(s, round_id=rnd.id)
    except (ValueError, OSError) as e:
        _fail(e)
    console.print(f"{rnd.name}: {p.items_complete}/{p.n_items} items complete, {p.n_judgements} judgements")
    for r in p.raters:
        console.print(f"  {r.rater_name}: {r.done} done ({r.duplicates_done} duplicates), {r.leased} leased, "
                      + (f"{r.expired} lease(s) lapsed (back to the pool at the next request for work), "
                         if r.expired else "")
                      + f"{r.time_on_task_s / 60:.1f} min")


@store_app.command("projects")
def store_projects(db: str = _DB_OPT) -> None:
    """The store's projects (the names --project takes)."""
    from preflab.store import db as store_db
    from preflab.store import ops

    try:
        engine = store_db.make_engine(db, create=False)
        with store_db.session_scope(engine, readonly=True) as s:
            names = ops.list_projects(s)
        engine.dispose()
    except ValueError as e:
        _fail(e)
    for n in names:
        console.print(n, markup=False)
    if not names:
        console.print("(no projects yet: `preflab store import` makes one)")


@store_app.command("reset-password")
def store_reset_password(
    name: str = typer.Argument(..., help="Rater (or admin) name."),
    db: str = _DB_OPT,
    project: str = typer.Option("default", help="Project."),
) -> None:
    """A new password and API token for a rater, printed once (the old ones stop working).

    For an admin locked out of the web app; admins reset raters from the admin page."""
    import secrets

    from preflab.store import db as store_db
    from preflab.store import ops

    password = secrets.token_urlsafe(12)

    def reset(s):  # noqa: ANN001, ANN202
        r = ops.rater_by_name(s, project_id=ops.require_project(s, name=project), name=name)
        if r is None:
            raise ops.StoreError(f"no rater {name!r} in project {project!r}")
        ops.set_password(s, rater_id=r.id, password=password)
        return r, ops.issue_api_token(s, rater_id=r.id)

    try:
        engine = store_db.make_engine(db, create=False)
        try:
            r, token = store_db.transact(engine, reset)
        finally:
            engine.dispose()
    except ValueError as e:
        _fail(e)
    console.print(f"new credentials for {r.role} {r.name!r} (shown once; the old password and token no longer work)"
                  + ("" if r.active else " [yellow]note: this account is deactivated[/yellow]"))
    console.print(f"  password: {password}", markup=False)
    console.print(f"  API token: {token}", markup=False)


# ---- ppo / dpo: policy optimisation (train/ppo.py, train/dpo.py) ------------------------


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _resumable(out: str, resume: bool) -> None:
    """``--resume`` into a directory that does not exist is a typo, not a fresh start."""
    from pathlib import Path

    if resume and not Path(out).is_dir():
        raise ValueError(f"--resume: nothing to resume in {out} (no such directory); drop --resume to start a new run")


def _abs(path) -> str:  # noqa: ANN001
    from pathlib import Path

    return str(Path(path).resolve())


def _rounds(spec: str | None) -> tuple[str, ...]:
    """``--rounds a,b`` as round kinds (train.data.load_store_examples checks them); None: the default."""
    from preflab.train.data import TRAINING_ROUNDS

    return TRAINING_ROUNDS if spec is None else tuple(k.strip() for k in spec.split(",") if k.strip())


def _main_process() -> bool:
    """False in the second and later processes of an `accelerate launch` (``RANK`` > 0)."""
    return os.environ.get("RANK", "0") in ("", "0")


def _record_lineage(db: str | None, project: str | None, run: str, **payload) -> None:
    """Record in the store what a CLI run came from (``preflab lineage``); runs without a store record nothing."""
    if db is None or not project:
        return
    from pathlib import Path

    from preflab.pipeline import record_run_lineage
    from preflab.store import db as store_db

    engine = store_db.make_engine(db, create=False)
    try:
        if record_run_lineage(engine, project=project, run=str(Path(run).resolve()), **payload):
            console.print(f"lineage of {run} recorded in {project!r} (preflab lineage)")
    finally:
        engine.dispose()


def _load_prompts(path: str | None, n: int, seed: int) -> list[str]:
    """Query texts from a file (JSONL with "prompt" or "text", or one per line), else sandbox train queries."""
    import json as _json

    if path is None:
        from preflab.sandbox.domain import generate_queries

        return [q.text for q in generate_queries(n, seed=seed)]
    out = []
    lines = open(path).read().splitlines()
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    try:  # JSONL by its name or by its content (a .txt of JSON objects is not prompt text)
        jsonl = path.endswith((".jsonl", ".json", ".ndjson")) or isinstance(_json.loads(first), dict)
    except _json.JSONDecodeError:
        jsonl = False
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                row = _json.loads(line)
            except _json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            key = next((k for k in ("prompt", "text") if isinstance(row, dict) and isinstance(row.get(k), str)), None)
            if key is None:
                raise ValueError(f"{path}:{i}: expected an object with a string 'prompt' (TRL's prompt-only "
                                 "format) or 'text' (the store's prompts.jsonl)")
            out.append(row[key])
        else:
            out.append(line)
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def _parse_alarm(spec: str | None) -> tuple[dict[str, float], dict[str, float]]:
    """``"formality=0.4,length=+20"`` -> ({"formality": 0.4}, {"length": 20.0}): absolute thresholds,
    and shifts above the reference policy's own rate (``+x``)."""
    from preflab.evaluate.detectors import TEXT_RATES

    known = sorted(TEXT_RATES)
    absolute: dict[str, float] = {}
    shifts: dict[str, float] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, value = (x.strip() for x in part.partition("="))
        if not sep:
            raise ValueError(f"--alarm: {part!r} is not name=number")
        if name not in known:
            raise ValueError(f"--alarm: unknown detector {name!r} (known: {', '.join(known)})")
        try:
            (shifts if value.startswith("+") else absolute)[name] = float(value)
        except ValueError:
            raise ValueError(f"--alarm: {part!r} is not name=number") from None
    return absolute, shifts


@app.command("ppo")
def ppo_cmd(
    policy: str = typer.Option(..., "--policy", help="HF dir of the SFT policy (also the frozen reference)."),
    reward: str = typer.Option(..., "--reward", help="HF dir of the reward model (e.g. an `rm train` run's model/)."),
    out: str = typer.Option(..., "--out", help="Run directory (config.json, metrics.jsonl, events.jsonl, ckpt/, eval/, policy/)."),
    prompts: str = typer.Option(None, "--prompts", help="Query texts: JSONL with 'prompt' (TRL) or 'text' (a store prompts.jsonl), or one per line (default: sandbox train queries)."),
    n_prompts: int = typer.Option(512, min=1, help="Sandbox queries to use when --prompts is not given."),
    eval_prompts: str = typer.Option(None, "--eval-prompts", help="Held-out queries the checkpoint evaluation samples "
                                     "(first 64; same formats as --prompts). Default: the sandbox's held-out queries, "
                                     "or with --prompts its first 64 (training queries, then not held out)."),
    config: str = typer.Option(None, "--config", help="TOML file; its \\[ppo] table sets PPOConfig fields."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's last checkpoint."),
    steps: int = typer.Option(None, help="PPOConfig.steps"),
    lr: float = typer.Option(None, help="PPOConfig.lr"),
    kl_beta: float = typer.Option(None, help="PPOConfig.kl_beta (initial beta)"),
    kl_controller: str = typer.Option(None, help="PPOConfig.kl_controller: fixed | adaptive"),
    kl_target: float = typer.Option(None, help="PPOConfig.kl_target (nats per response)"),
    kl_horizon: int = typer.Option(None, help="PPOConfig.kl_horizon: the adaptive controller's horizon in samples "
                                              "(about two rollout batches holds a target; 0: a tenth of the run)"),
    kl_beta_min: float = typer.Option(None, help="PPOConfig.kl_beta_min: the adaptive beta's floor (set it to "
                                                 "--kl-beta so beta does not wind down while KL still rises)"),
    alarm: str = typer.Option(None, help="Alarm thresholds on the text detectors, e.g. 'formality=0.4,hedging=0.5'; "
                                         "'formality=+0.1' = the reference policy's own rate + 0.1."),
    alarm_window: int = typer.Option(None, help="PPOConfig.alarm_window: compare the mean of the last N steps' "
                                                "readings with the threshold (1: each rollout alone)."),
    checkpoint_every: int = typer.Option(None, help="PPOConfig.checkpoint_every"),
    seed: int = typer.Option(None, help="PPOConfig.seed"),
    prompt_format: str = typer.Option("dialogue", help="How the policy sees a query: dialogue ('User: ...\\n"
                                                        "Assistant:') | raw | chat (its tokenizer's chat template)."),
    db: str = typer.Option(None, "--db", help="Store to record the run's lineage in (policy, reward model, steps)."),
    project: str = typer.Option(None, "--project", help="Project in --db."),
    threads: int = _THREADS_OPT,
) -> None:
    """Optimise a policy against a reward model with PPO and a KL leash (fixed, adaptive, alarm-driven)."""
    _set_threads(threads)
    import torch

    from preflab.config import resolve
    from preflab.evaluate.detectors import text_rates
    from preflab.models.hf import load_policy
    from preflab.models.sampling import sample
    from preflab.pipeline import reward_fn_from, sample_eval_hook
    from preflab.train.checkpoint import refuse_to_overwrite
    from preflab.train.data import dialogue_prompt
    from preflab.train.ppo import PPOConfig, train_ppo

    try:
        if db is not None or project is not None:  # fail now, not after training
            if db is None or not project:
                raise ValueError("--db and --project go together (the store that records the run's lineage)")
            from preflab.store import db as store_db
            from preflab.store import ops

            engine = store_db.make_engine(db, create=False)
            with store_db.session_scope(engine, readonly=True) as s:
                ops.require_project(s, name=project)
            engine.dispose()
        thresholds, shifts = _parse_alarm(alarm)
        cfg = resolve(PPOConfig, config, "ppo", dict(steps=steps, lr=lr, kl_beta=kl_beta, kl_controller=kl_controller,
                                                     kl_target=kl_target, kl_horizon=kl_horizon,
                                                     kl_beta_min=kl_beta_min, checkpoint_every=checkpoint_every, seed=seed,
                                                     alarm_thresholds=thresholds or None, alarm_window=alarm_window))
        refuse_to_overwrite(out, resume=resume)  # before loading anything
        _resumable(out, resume)
        queries = _load_prompts(prompts, n_prompts, cfg.seed)
        if eval_prompts is not None:
            held = _load_prompts(eval_prompts, 0, cfg.seed)[:64]
        elif prompts is None:
            from preflab.sandbox.domain import generate_queries

            held = [q.text for q in generate_queries(64, seed=cfg.seed, split="heldout")]
        else:
            held = queries[:64]
            console.print("[yellow]note:[/yellow] the checkpoint evaluation samples the first 64 training prompts "
                          "(give --eval-prompts for held-out ones)")
        pol, tok = load_policy(policy)
        ref, _ = load_policy(policy)
        # the policy's prompts in its own format; the reward model gets the query back and formats it its way
        query_of = {dialogue_prompt(q, prompt_format, tok): q for q in [*queries, *held]}
        reward_fn = reward_fn_from(reward, to_query=query_of.__getitem__)
    except (ValueError, OSError) as e:
        _fail(e)
    train_prompts = list(dict.fromkeys(dialogue_prompt(q, prompt_format, tok) for q in queries))
    heldout = [dialogue_prompt(q, prompt_format, tok) for q in held]
    if shifts:  # relative thresholds: the reference's own rates on the held-out prompts, 4 samples each
        s = sample(ref, tok, heldout * 4, max_new_tokens=cfg.max_new_tokens,
                   generator=torch.Generator().manual_seed(cfg.seed))
        base = text_rates(s.texts)
        cfg.alarm_thresholds = {**cfg.alarm_thresholds, **{k: base[k] + d for k, d in shifts.items()}}
        for k, d in shifts.items():
            console.print(f"alarm: {k} above {cfg.alarm_thresholds[k]:.3g} (the reference's {base[k]:.3g} "
                          f"+ {d:g}, on {len(s.texts)} samples of the held-out prompts)")

    eval_hook = sample_eval_hook(tok, heldout, max_new_tokens=cfg.max_new_tokens, ref=ref, reward_fn=reward_fn)
    try:
        res = train_ppo(cfg, policy=pol, ref=ref, tokenizer=tok, reward_fn=reward_fn, prompts=train_prompts,
                        run_dir=out, eval_hook=eval_hook, detectors=text_rates if cfg.alarm_thresholds else None,
                        resume=resume, inputs={"policy": _abs(policy), "reward_model": _abs(reward),
                                               "prompt_format": prompt_format})
        if not _main_process():  # under `accelerate launch`: the first process records and reports
            return
        _record_lineage(db, project, out, reward_model=_abs(reward), parent=_abs(policy), steps=res.steps,
                        policy_dir=_abs(res.policy_dir))
    except ValueError as e:
        _fail(e)
    last = res.metrics[-1] if res.metrics else {}
    console.print(f"ppo: {res.steps} steps{_resumed(res)}; score {last.get('objective/scores', float('nan')):.3f}, "
                  f"kl {last.get('objective/kl', float('nan')):.3f}, beta {last.get('objective/beta', float('nan')):.4g}; "
                  f"{len(res.events)} beta changes (events.jsonl); policy in {res.policy_dir}")


_TRAIN_KEYS = ("objective/kl", "objective/scores", "objective/beta",  # ppo
               "dpo/loss", "dpo/accuracy", "val/accuracy",  # dpo
               "train/loss", "train/accuracy", "eval/accuracy")  # rm (its held-out accuracy is eval/accuracy)


@app.command("checkpoints")
def checkpoints_cmd(
    run: str = typer.Argument(..., help="Run directory of `ppo`, `dpo` or `rm train`."),
    keys: str = typer.Option(None, help="Columns, comma-separated (default: the trainer's KL/score/loss and "
                                        "every key of eval/step_N.json)."),
    export: int = typer.Option(None, "--export", help="Write this step's checkpoint as a model directory."),
    out: str = typer.Option(None, "--out", help="With --export: the new model directory."),
    like: str = typer.Option(None, "--like", help="With --export: a model dir of the same architecture and tokenizer "
                                                  "(default: the run's final policy/ or model/)."),
) -> None:
    """Each checkpoint's training and held-out evaluation numbers, and --export STEP --out DIR to turn
    one into a model directory (for ab create, gates, rm score) when the final one is not the best."""
    import json
    from pathlib import Path

    from rich.table import Table

    from preflab.train.checkpoint import (
        checkpoint_step,
        export_checkpoint,
        list_checkpoints,
    )

    root = Path(run)
    if not root.is_dir():
        _fail(ValueError(f"RUN: no directory {root}"))
    kept = {checkpoint_step(p): p for p in list_checkpoints(root)}
    evals = {}
    for f in sorted((root / "eval").glob("step_*.json")) if (root / "eval").is_dir() else []:
        try:
            evals[int(f.stem.split("_")[1])] = json.loads(f.read_text())
        except (ValueError, IndexError):
            _fail(ValueError(f"{f}: not an evaluation file (eval/step_N.json with a JSON object)"))
    if export is not None:
        try:
            if not out:
                raise ValueError("--out: --export needs the new model directory")
            if export not in kept:
                raise ValueError(f"--export: no checkpoint of step {export} on disk in {root / 'ckpt'} "
                                 f"(kept: {', '.join(map(str, kept)) or 'none'}; keep_last = 0 in [ppo] / [dpo], "
                                 "keep_checkpoints = 0 in [rm], keeps all)")
            if like is None:
                like = next((str(root / d) for d in ("policy", "model") if (root / d / "config.json").is_file()), None)
                if like is None:
                    raise ValueError("--like: the run has no final policy/ or model/ yet; give the model it "
                                     "started from")
            path = export_checkpoint(kept[export], like, out)
        except (ValueError, OSError) as e:
            _fail(e)
        console.print(f"step {export} of {root} -> {path} (a model directory)")
        return
    rows: dict[int, dict] = {}
    if (root / "metrics.jsonl").is_file():
        for n, line in enumerate((root / "metrics.jsonl").read_text().splitlines(), 1):
            try:
                if line.strip():
                    r = json.loads(line)
                    rows.setdefault(int(r.get("step", -1)), {}).update(r)
            except (ValueError, TypeError, AttributeError):
                _fail(ValueError(f"{root / 'metrics.jsonl'}:{n}: not a JSON object with a step"))
    steps = sorted(set(kept) | set(evals))
    if not steps:
        _fail(ValueError(f"{root}: no checkpoints (ckpt/step_N) and no evaluations (eval/step_N.json)"))
    if keys:
        cols = [k.strip() for k in keys.split(",") if k.strip()]
    else:
        cols = [k for k in _TRAIN_KEYS if any(k in rows.get(st, {}) for st in steps)]
        cols += sorted({k for e in evals.values() for k, v in e.items() if k != "step" and isinstance(v, (int, float))}
                       - set(cols))
    table = {st: {**rows.get(st, {}), **evals.get(st, {})} for st in steps}
    cell = {(st, c): f"{v:.4g}" if isinstance(v := table[st].get(c), (int, float)) else "-" for st in steps for c in cols}
    title = f"{root}: {len(steps)} checkpoints, {len(kept)} on disk (metrics.jsonl at that step; eval/step_N.json)"
    if len(cols) <= 6:  # a row per checkpoint
        t = Table(title=title)
        for c in ("step", "on disk", *cols):
            t.add_column(c, justify="right")
        for st in steps:
            t.add_row(str(st), "yes" if st in kept else "no", *(cell[st, c] for c in cols))
    else:  # many numbers: a column per checkpoint, a row per number
        t = Table(title=title)
        t.add_column("step", overflow="fold")
        for st in steps:
            t.add_column(str(st), justify="right")
        t.add_row("on disk", *("yes" if st in kept else "no" for st in steps), end_section=True)
        for c in cols:
            t.add_row(c, *(cell[st, c] for st in steps))
    console.print(t)
    if kept:
        console.print(f"to use one: preflab checkpoints {root} --export STEP --out DIR")


@app.command("dpo")
def dpo_cmd(
    policy: str = typer.Option(..., "--policy", help="HF dir of the SFT policy (also the frozen reference)."),
    out: str = typer.Option(..., "--out", help="Run directory (config.json, metrics.jsonl, ckpt/, policy/)."),
    db: str = typer.Option(None, "--db", help="Store URL; with --project, train on its latest judgements."),
    project: str = typer.Option(None, "--project", help="Project name in the store."),
    data: str = typer.Option(None, "--data", help="Instead of the store: JSONL with prompt/chosen/rejected."),
    rounds: str = typer.Option(None, "--rounds", help=ROUNDS_HELP),
    val_fraction: float = typer.Option(0.1, min=0.0, max=0.9, help="Share of prompts held out for val/accuracy."),
    config: str = typer.Option(None, "--config", help="TOML file; its \\[dpo] table sets DPOConfig fields."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's last checkpoint."),
    loss: str = typer.Option(None, help="DPOConfig.loss: sigmoid | ipo"),
    beta: float = typer.Option(None, help="DPOConfig.beta"),
    lr: float = typer.Option(None, help="DPOConfig.lr"),
    epochs: int = typer.Option(None, help="DPOConfig.epochs"),
    batch_size: int = typer.Option(None, help="DPOConfig.batch_size"),
    rpo_alpha: float = typer.Option(None, help="DPOConfig.rpo_alpha"),
    seed: int = typer.Option(None, help="DPOConfig.seed"),
    eval_prompts: str = typer.Option(None, "--eval-prompts", help="Queries each checkpoint's evaluation samples "
                                     "(first 64; formats as ppo --prompts). Default: the held-out split's prompts."),
    reward: str = typer.Option(None, "--reward", help="A reward model dir: checkpoint evaluations also score "
                                                      "their samples (eval/reward)."),
    eval_max_new_tokens: int = typer.Option(64, min=1, help="Longest response a checkpoint evaluation samples."),
    threads: int = _THREADS_OPT,
) -> None:
    """Fit a policy directly to judged pairs with DPO (or IPO) against the frozen SFT policy."""
    _set_threads(threads)
    from preflab.config import resolve
    from preflab.models.hf import load_policy
    from preflab.pipeline import reward_fn_from, sample_eval_hook
    from preflab.train.checkpoint import refuse_to_overwrite
    from preflab.train.data import dialogue_prompt, load_jsonl, load_store_examples, split_by_prompt
    from preflab.train.dpo import DPOConfig, train_dpo

    try:
        if (data is None) == (db is None):
            raise ValueError("give either --db URL --project NAME or --data file.jsonl")
        cfg = resolve(DPOConfig, config, "dpo", dict(loss=loss, beta=beta, lr=lr, epochs=epochs, batch_size=batch_size,
                                                     rpo_alpha=rpo_alpha, seed=seed))
        refuse_to_overwrite(out, resume=resume)  # before loading anything
        _resumable(out, resume)
        if data is not None:
            examples = load_jsonl(data)
        else:
            if not project:
                raise ValueError("--project: required with --db")
            examples = load_store_examples(db, project=project, round_kinds=_rounds(rounds))
        train, val = split_by_prompt(examples, val_fraction=val_fraction, seed=cfg.seed)
        _warn_data(train, val)
        if eval_prompts is not None:
            held = _load_prompts(eval_prompts, 0, cfg.seed)[:64]
        else:
            held = list(dict.fromkeys(e.prompt for e in (val or train)))[:64]
            if not val:
                console.print("[yellow]note:[/yellow] the checkpoint evaluation samples the first 64 training prompts "
                              "(no held-out split; give --eval-prompts for held-out ones)")
        pol, tok = load_policy(policy)
        ref, _ = load_policy(policy)
        heldout = [dialogue_prompt(q, cfg.prompt_format, tok) for q in held]
        query_of = dict(zip(heldout, held, strict=True))
        eval_hook = sample_eval_hook(tok, heldout, max_new_tokens=eval_max_new_tokens, ref=ref,
                                     reward_fn=reward_fn_from(reward, to_query=query_of.__getitem__) if reward else None)
        res = train_dpo(cfg, policy=pol, ref=ref, tokenizer=tok, train=train, val=val, run_dir=out, resume=resume,
                        inputs={"policy": _abs(policy)}, eval_hook=eval_hook)
        if not _main_process():  # under `accelerate launch`: the first process records and reports
            return
        _record_lineage(db, project, out, trained_on_judgements=True, round_kinds=_rounds(rounds),
                        parent=_abs(policy), steps=res.steps,
                        policy_dir=_abs(res.policy_dir))
    except (ValueError, OSError) as e:
        _fail(e)
    last = res.metrics[-1] if res.metrics else {}
    ties = sum(e.is_tie for e in train)
    console.print(f"dpo: {res.steps} steps{_resumed(res)} on {_judged(train)} ({_judged(val)} held out"
                  + (f"; {ties} ties left out: no preference to learn" if ties else "") + "); "
                  f"loss {last.get('dpo/loss', float('nan')):.3f}, val accuracy {last.get('val/accuracy', float('nan')):.3f}; "
                  f"policy in {res.policy_dir}")


# ---- sandbox what-if experiments (experiments.py) -----------------------------------------


@sandbox_app.command("experiment")
def sandbox_experiment(
    name: str = typer.Argument(..., help="consistency-vs-volume, kl-sweep, margin or learning-curve."),
    run: str = typer.Option("runs/experiments", "--run", help="Run directory (e.g. a demo's); the plot goes to "
                                                              "RUN/experiments/NAME.json, work is cached and resumes."),
    base: str = typer.Option("", "--base", help="A built sandbox model dir (default: RUN/base, built if missing)."),
    seed: int = typer.Option(0, help="Seed of raters, pairs, training and sampling."),
    full: bool = typer.Option(False, "--full", help="The story's scale: 6,000 calibrated vs 60,000 crowd pairs "
                                                    "(hours on a CPU)."),
    pairs: int = typer.Option(None, help="N: pairs labelled by the 5 calibrated raters (default 200)."),
    volume_ratio: int = typer.Option(None, help="The crowd labels this many times N pairs (default 10)."),
    crowd_raters: int = typer.Option(None, help="Uncalibrated raters in the crowd (default 50)."),
    rubric: str = typer.Option(None, help="Rubric the raters judge under: v1 or v2 (default v2)."),
    eval_pairs: int = typer.Option(None, help="Held-out pairs for reward-model accuracy (default 400)."),
    ppo_steps: int = typer.Option(None, help="PPO iterations per run (default 12)."),
    ppo_prompts: int = typer.Option(None, help="Prompts per PPO rollout batch (default 16)."),
    ppo_eval_every: int = typer.Option(None, help="Measure gold + KL every N PPO steps (default 4)."),
    eval_queries: int = typer.Option(None, help="Held-out queries for gold utility and KL (default 64)."),
    oracle_queries: int = typer.Option(None, help="Held-out queries of the oracle frontier (default 32)."),
    max_new_tokens: int = typer.Option(None, help="Longest sampled response (default: the base build's longest response + 8)."),
    betas: str = typer.Option(None, help="kl-sweep: fixed betas, comma-separated (default 0.005,0.02,0.1,0.5)."),
    margins: str = typer.Option(None, help="margin: presets compared, comma-separated (default none,llama2_small)."),
    curve_sizes: str = typer.Option(None, help="learning-curve: pair counts, comma-separated, ascending "
                                               "(default 250,500,1000,2000; --full 750 ... 24,000)."),
    rm_epochs: int = typer.Option(None, help="Reward-model epochs (default 1; the demo's: 3)."),
    rm_lr: float = typer.Option(None, help="Reward-model learning rate (default 1e-4; the demo's: 1e-3)."),
    ppo: bool = typer.Option(True, help="consistency-vs-volume: also a short PPO pass on each reward model."),
    progress: bool = typer.Option(True, help="Show the trainers' progress bars."),
    threads: int = typer.Option(None, min=1, show_default=False,
                                help="torch CPU threads (default 1: ExperimentConfig.threads, the least waste on a busy "
                                     "machine)."),
) -> None:
    """A what-if experiment in the sandbox, written as a plot the report shows (see docs/experiments.md)."""
    import json

    from preflab.config import from_dict, to_dict
    from preflab.experiments import EXPERIMENTS, ExperimentConfig, run_experiment

    if name not in EXPERIMENTS:
        _fail(ValueError(f"experiment: unknown name {name!r} (known: {', '.join(EXPERIMENTS)})"))
    flags = {"pairs": pairs, "volume_ratio": volume_ratio, "crowd_raters": crowd_raters, "rubric": rubric,
             "eval_pairs": eval_pairs, "ppo_steps": ppo_steps, "ppo_prompts": ppo_prompts,
             "ppo_eval_every": ppo_eval_every, "eval_queries": eval_queries, "oracle_queries": oracle_queries,
             "max_new_tokens": max_new_tokens, "rm_epochs": rm_epochs, "rm_lr": rm_lr, "threads": threads}
    try:
        if betas is not None:
            flags["betas"] = [float(b) for b in betas.split(",") if b.strip()]
        if margins is not None:
            flags["margins"] = [m.strip() for m in margins.split(",") if m.strip()]
        if curve_sizes is not None:
            try:
                flags["curve_sizes"] = [int(x) for x in curve_sizes.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"--curve-sizes: expected comma-separated pair counts, got {curve_sizes!r}") from None
        cfg = ExperimentConfig(run=run, base=base, seed=seed, cv_ppo=ppo, progress=progress)
        if full:
            cfg = cfg.full()
        cfg = from_dict(ExperimentConfig, {**to_dict(cfg), **{k: v for k, v in flags.items() if v is not None}})
        paths = run_experiment(name, cfg, console=console)
    except (ValueError, OSError) as e:
        _fail(e)
    for p in paths:
        d = json.loads(p.read_text())
        console.print(f"[bold]{d['title']}[/bold]")
        console.print(f"{d['notes']}\nwrote {p}", markup=False, highlight=False)
    console.print(f"render with: preflab report {run}", markup=False)


# ---- end of commands -------------------------------------------------------------------


def _interrupted_hint(argv: list[str]) -> str:
    """What to do after Ctrl-C, for the command that was running."""
    cmd = " ".join(a for a in argv[1:3] if not a.startswith("-"))
    if cmd.startswith(("rm train", "ppo", "dpo", "rm curve")):
        return ("; the run directory keeps everything up to its last checkpoint: the same command with --resume "
                "continues from there")
    if cmd.startswith(("demo", "sandbox build", "sandbox experiment")):
        return "; finished stages are kept: the same command again continues where it stopped"
    return ""


def main() -> None:
    try:
        app()
    except SystemExit as e:  # Typer turns Ctrl-C into exit status 130, silently
        if e.code == 130 and _main_process():  # once under `accelerate launch`, not once per process
            console.print(f"[yellow]interrupted[/yellow]{_interrupted_hint(sys.argv)}")
        raise
    except ConfigError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        sys.exit(2)
    except Exception as e:
        # an unreachable or unmigrated store is the user's to fix, not a traceback
        text = str(getattr(e, "orig", None) or e).strip()
        detail = text.splitlines()[0] if text else type(e).__name__
        kind = type(e).__name__ if type(e).__module__.startswith("sqlalchemy") else ""
        if kind == "OperationalError" or (kind == "ProgrammingError" and "does not exist" in detail):
            console.print(f"[red]error:[/red] the store (--db) failed: {escape(detail)}{_db_hint(detail)}")
            sys.exit(2)
        raise


def _db_hint(detail: str) -> str:
    """What to do about a store that failed to open, from the driver's message (SQLite or PostgreSQL)."""
    import re

    if m := re.search(r'database "([^"]+)" does not exist', detail):
        return f" (create the database first: `createdb {m.group(1)}`, then `preflab store migrate --db URL`)"
    if re.search(r'role "[^"]+" does not exist|password authentication failed|no password supplied', detail):
        return " (check the user name and password in --db)"
    if "connection refused" in detail.lower() or "could not translate host name" in detail:
        return " (is PostgreSQL running at the host and port in --db?)"
    if "no such table" in detail or re.search(r'relation "[^"]+" does not exist', detail):
        return " (a new database? run `preflab store migrate --db URL` first)"
    return ""


if __name__ == "__main__":
    main()
