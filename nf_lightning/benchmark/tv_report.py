"""``torchvision_check``'s acceptance checks, summary and table, over seeds at each method's chosen rate.

Gaps are in accuracy points, BP (or the scratch exit) minus NeuroFlux, on
the means over seeds. Issue 10's checks: no exit below twice chance, and
NeuroFlux's deployed exit within 3 points of BP on the test split.

Example:
    >>> aggregate([{"test": 0.5, "final_val": 0.6, "best_val": 0.6, "seconds": 10.0, "row": {"seed": 0}},
    ...            {"test": 0.7, "final_val": 0.6, "best_val": 0.6, "seconds": 20.0, "row": {"seed": 1}}])["test"]
    {'mean': 0.6, 'std': 0.1414, 'n': 2}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nf_lightning.benchmark.stats import mean_std
from nf_lightning.benchmark.tv_rows import DATASETS, MODELS, best_rate

ACCEPT_GAP_POINTS = 3.0
"""NeuroFlux's deployed exit must be within this many accuracy points of BP (issue 10)."""
CHANCE_FACTOR = 2.0
"""No exit may be below this multiple of chance (issue 10)."""
METHODS = ("bp", "neuroflux", "scratch_exit")


def aggregate(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over seeds of one method's results at its rate."""
    return {
        "seeds": [r["row"]["seed"] for r in results],
        "test": mean_std(r["test"] for r in results),
        "final_val": mean_std(r["final_val"] for r in results),
        "best_val": mean_std(r["best_val"] for r in results),
        "seconds": mean_std(r["seconds"] for r in results),
        "units": [r["row"].get("unit", r.get("selected_unit")) for r in results],
    }


def checks(bp: Mapping[str, Any], nf: Mapping[str, Any], nf_runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Issue 10's acceptance for one model x data set from BP's and NeuroFlux's aggregates and NeuroFlux's runs."""
    chance = nf_runs[0]["chance"]
    exits = [(int(u), a) for r in nf_runs for u, a in r["exit_val"].items()]
    worst_unit, worst = min(exits, key=lambda e: e[1])
    gap_test = 100 * (bp["test"]["mean"] - nf["test"]["mean"])
    return {
        "chance": chance,
        "twice_chance": CHANCE_FACTOR * chance,
        "worst_exit_unit": worst_unit,
        "worst_exit_val": worst,
        "exits_below_twice_chance": sorted({u for u, a in exits if a < CHANCE_FACTOR * chance}),
        "every_exit_above_twice_chance": worst >= CHANCE_FACTOR * chance,
        "gap_test_points": round(gap_test, 2),
        "gap_val_points": round(100 * (bp["final_val"]["mean"] - nf["best_val"]["mean"]), 2),
        "best_exit_within_3_points": gap_test <= ACCEPT_GAP_POINTS,
    }


def summarize(results: Sequence[Mapping[str, Any]], preset_name: str, preset: Mapping[str, Any]) -> dict[str, Any]:
    """Per model x data set: each method at its chosen rate over seeds, the checks, the scratch exit's gap."""
    pairs = []
    for data in preset["datasets"]:
        for model in preset["models"]:
            pair: dict[str, Any] = {"model": model, "data": data, "lrs": {}, "methods": {}, "runs": {}}
            for method in METHODS:
                lr = best_rate(results, model, data, method)
                runs = sorted((r for r in results if "error" not in r and r["row"]["model"] == model
                               and r["row"]["data"] == data and r["row"]["method"] == method
                               and r["row"]["lr"] == lr), key=lambda r: r["row"]["seed"])  # fmt: skip
                pair["lrs"][method], pair["runs"][method] = lr, runs
                pair["methods"][method] = aggregate(runs) if runs else None
            m = pair["methods"]
            pair["errors"] = [r["name"] + ": " + r["error"] for r in results if "error" in r
                              and (r["row"]["model"], r["row"]["data"]) == (model, data)]  # fmt: skip
            pair["checks"] = checks(m["bp"], m["neuroflux"], pair["runs"]["neuroflux"]) if m["bp"] and m["neuroflux"] \
                else None  # fmt: skip
            if m["scratch_exit"] and m["neuroflux"]:
                pair["scratch_gap_test_points"] = round(100 * (m["scratch_exit"]["test"]["mean"]
                                                               - m["neuroflux"]["test"]["mean"]), 2)  # fmt: skip
            pairs.append(pair)
    complete = [p["checks"] for p in pairs if p["checks"] is not None]
    return {
        "preset": preset_name, "settings": dict(preset), "models": MODELS, "datasets": DATASETS,
        "total_row_seconds": round(sum(r.get("seconds", 0.0) for r in results), 1),
        "acceptance": {
            "pairs_complete": len(complete), "pairs": len(pairs),
            "every_exit_above_twice_chance": bool(complete) and all(c["every_exit_above_twice_chance"] for c in complete),
            "best_exit_within_3_points": bool(complete) and all(c["best_exit_within_3_points"] for c in complete),
        },
        "pairs": pairs,
    }  # fmt: skip


def _pct(stat: Mapping[str, Any] | None) -> str:
    if not stat or stat["mean"] is None:
        return "-"
    return f"{100 * stat['mean']:.1f}" + (f" ± {100 * stat['std']:.1f}" if stat["n"] > 1 else "")


def markdown(summary: Mapping[str, Any]) -> str:
    """The check's table: per model x data set, BP, NeuroFlux and the scratch exit over seeds, then the checks."""
    s = summary["settings"]
    lines = [
        f"# torchvision check ({summary['preset']} preset)", "",
        f"Every network with a 32 px stem (3x3 stride-1 first convolution, no max-pool). BP and the scratch exit "
        f"(the exit NeuroFlux deployed in that seed, BP-trained from a fresh initialisation): {s['bp_epochs']} "
        f"epochs, batch 128, SGD nesterov, cosine. NeuroFlux: `NeuroFluxStrategy(memory_budget=<budget>, "
        f"epochs_per_block={s['epochs_per_block']}, block_patience={s['block_patience']})`, then a "
        f"{s.get('polish_epochs', 0)}-epoch polish of its exit. Rates {', '.join(map(str, s['lrs']))} at batch 128, "
        f"each method's best on seed 0 (final validation accuracy), {s['seeds']} seed(s). Accuracies in %, mean ± "
        "standard deviation over seeds; gaps in points (the other method minus NeuroFlux).", "",
        f"Code: {(summary.get('code') or {}).get('commit')}; rows reused from an earlier invocation of the same code: "
        f"{len(summary.get('reused') or [])}.", "",
        "| model | data | BP lr | BP test | BP s | NF lr | NF exits (units per seed) | NF test | NF s | scratch test "
        "| scratch s | gap BP | gap scratch | every exit >= 2x chance | within 3 of BP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for p in summary["pairs"]:
        m, c, lrs = p["methods"], p["checks"], p["lrs"]
        if c is None:
            lines.append(f"| {p['model']} | {p['data']} | failed: {'; '.join(p['errors']) or 'missing rows'} |"
                         + " |" * 12)  # fmt: skip
            continue
        scratch = m["scratch_exit"] or {}
        scratch_seconds = f"{scratch['seconds']['mean']:.0f}" if scratch else "-"
        lines.append(
            f"| {p['model']} | {p['data']} | {lrs['bp']} | {_pct(m['bp']['test'])} | {m['bp']['seconds']['mean']:.0f} "
            f"| {lrs['neuroflux']} | {', '.join(map(str, m['neuroflux']['units']))} | {_pct(m['neuroflux']['test'])} | "
            f"{m['neuroflux']['seconds']['mean']:.0f} | {_pct(scratch.get('test'))} | "
            f"{scratch_seconds} | {c['gap_test_points']:+.1f} | "
            f"{p.get('scratch_gap_test_points', '-')} | {'yes' if c['every_exit_above_twice_chance'] else 'NO'} | "
            f"{'yes' if c['best_exit_within_3_points'] else 'NO'} |"
        )
    a = summary["acceptance"]
    lines += ["", f"Acceptance ({a['pairs_complete']} of {a['pairs']} pairs complete): every exit >= 2x chance: "
              f"{'yes' if a['every_exit_above_twice_chance'] else 'NO'}; NeuroFlux within 3 points of BP (test): "
              f"{'yes' if a['best_exit_within_3_points'] else 'NO'}. Training time over all rows: "
              f"{summary['total_row_seconds'] / 60:.1f} min."]  # fmt: skip
    return "\n".join(lines) + "\n"
