"""The ablation table of issue 21: one row per lever, each row one ``compare.py`` invocation's summary.

A lever is an invocation with ``--local-set`` (NeuroFlux's runs only) or
``--scratch-set`` (``scratch_exit``'s: its tries, so that it gets as many as
NeuroFlux). Every row's figures come from its own summary, where NeuroFlux, BP
and ``scratch_exit`` were timed side by side; the table only puts them together
and counts the configurations each method was given.

    python experiments/compare.py --ablation experiments/results/compare/levers   # writes levers/ablation.md

Example:
    >>> lever_of({"local_set": ["polish.lr=0.02"], "scratch_set": []})
    'NeuroFlux `polish.lr=0.02`'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nf_lightning.benchmark.readme import load_summary, shown_path
from nf_lightning.benchmark.report import override_parts, pct, seconds
from nf_lightning.benchmark.stats import format_speedup

TABLE_FILE = "ablation.md"
HEADER = (
    "| lever | seeds | target % | NeuroFlux s to target | deployed units | NeuroFlux test % | scratch_exit s | "
    "scratch_exit test % | vs scratch_exit (ratio of means; per seed) | vs BP | rates (NeuroFlux / scratch_exit) | "
    "load | code | summary |"
)


def lever_of(settings: Mapping[str, Any]) -> str:
    """The row's lever: the overrides given to NeuroFlux or ``scratch_exit`` alone (``none`` for the defaults)."""
    parts = override_parts(settings, (("local_set", "NeuroFlux"), ("scratch_set", "scratch_exit")))
    return "; ".join(parts) or "none (the defaults)"


def tries(summaries: Sequence[Mapping[str, Any]], method: str) -> int:
    """How many configurations of ``method`` the summaries tried: distinct (its overrides, rate) pairs.

    >>> grid = [{"method": "neuroflux", "lr": 0.05}, {"method": "bp", "lr": 0.05}]
    >>> tries([{"settings": {"local_set": ["a=1"]}, "results": {"grid": grid}},
    ...        {"settings": {"local_set": []}, "results": {"grid": grid}}], "neuroflux")
    2
    """
    key = "scratch_set" if method == "scratch_exit" else "local_set"
    return len({(tuple(s["settings"].get(key) or []), row["lr"])
                for s in summaries for row in s["results"]["grid"] if row["method"] == method})  # fmt: skip


def ablation_row(summary: Mapping[str, Any], shown: str) -> str:
    """One lever's row from its summary (``shown``: where the summary lies)."""
    results = summary["results"]
    nf, scratch = results["methods"]["neuroflux"], results["methods"].get("scratch_exit") or {}
    speedups = results["speedups"]
    versus = speedups.get("scratch_exit")
    per_seed = ", ".join(format_speedup(s) for s in versus["per_seed"]) if versus else "-"
    nf_lr = results["lrs"].get("neuroflux")
    units = [str(r["deployed_unit"]) for r in sorted(results["runs"], key=lambda r: r["seed"])
             if r["method"] == "neuroflux" and r["lr"] == nf_lr and r["status"] == "ok"]  # fmt: skip
    loads = [r["provenance"]["load"]["mean"] for r in results["runs"]
             if r["method"] in ("neuroflux", "scratch_exit") and (r.get("provenance") or {}).get("load")]  # fmt: skip
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
    return (f"| {lever_of(summary['settings'])} | {nf['runs']} | {100 * results['target']:.1f} | "
            f"{seconds(nf['time_to_target'])} | {', '.join(units) or '-'} | {pct(nf['test_acc'])} | "
            f"{seconds(scratch.get('time_to_target'))} | {pct(scratch.get('test_acc'))} | "
            f"{format_speedup(versus and versus['ratio_of_means'])}; {per_seed} | "
            f"{format_speedup((speedups.get('bp') or {}).get('ratio_of_means'))} | {_rate(nf_lr)} / "
            f"{_rate(results['lrs'].get('scratch_exit'))} | {load} | {_commits(results)} | `{shown}` |")  # fmt: skip


def _commits(results: Mapping[str, Any]) -> str:
    return ", ".join(sorted({c[:7] for c in results["commits"]}))


def _rate(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:g}"


def ablation_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """The Markdown table, rows in the order given (``{where the summary lies: summary}``), with the tries counted."""
    listed = list(summaries.values())
    lines = [
        f"Configurations tried: NeuroFlux {tries(listed, 'neuroflux')}, scratch_exit {tries(listed, 'scratch_exit')} "
        "(distinct overrides and rate). Speed-ups are scratch_exit's or BP's time to the target over NeuroFlux's, "
        "timed in the same invocation from the same code: under 1x, NeuroFlux is slower. Load: the 1-minute load "
        "average during NeuroFlux's and scratch_exit's runs.",
        "",
        HEADER,
        "|" + " --- |" * (HEADER.count("|") - 1),
    ]
    lines += [ablation_row(summary, shown) for shown, summary in summaries.items()]
    return "\n".join(lines) + "\n"


def write_ablation(directory: Path, root: Path) -> Path:
    """Write ``directory/ablation.md`` from every ``directory/*/summary.json`` (oldest first); its path."""
    loaded = [(p, load_summary(p)) for p in directory.glob("*/summary.json")]
    if not loaded:
        raise SystemExit(f"no lever summaries under {directory}: run compare.py with --local-set and --out there")
    loaded.sort(key=lambda item: item[1]["provenance"]["started_at"])
    summaries = {shown_path(p.parent, root): summary for p, summary in loaded}
    out = directory / TABLE_FILE
    out.write_text(f"# Ablation rows (issue 21)\n\n{ablation_table(summaries)}")
    return out
