"""The benchmark's tables as Markdown (``summary.md``; the README section reuses them), from a summary only.

Example:
    >>> pct({"mean": 0.5, "std": 0.0, "n": 1})
    '50.0'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nf_lightning.benchmark.presets import LABELS, TEST_SPLITS
from nf_lightning.benchmark.stats import format_speedup

README_BEGIN = "<!-- compare:begin -->"
README_END = "<!-- compare:end -->"
BASELINES = ("scratch_exit", "depth_search", "bp", "bp_ckpt")
"""What the README compares NeuroFlux with, in this order."""


def pct(stat: Mapping[str, Any] | None, spread: bool = True) -> str:
    """``69.4 ± 0.4`` from a ``mean_std`` of fractions (``-`` when empty).

    >>> pct({"mean": 0.694, "std": 0.004, "n": 3}), pct(None)
    ('69.4 ± 0.4', '-')
    """
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{100 * stat['mean']:.1f}"
    return f"{text} ± {100 * stat['std']:.1f}" if spread and stat["n"] > 1 else text


def seconds(stat: Mapping[str, Any] | None) -> str:
    """A mean time, ``>`` and the count reached when it is a lower bound.

    >>> seconds({"mean": 90.4, "lower_bound": True, "reached": 1, "n": 2})
    '>90 (1/2 reached)'
    """
    if not stat or stat.get("mean") is None:
        return "-"
    if stat.get("lower_bound"):
        return f">{stat['mean']:.0f} ({stat['reached']}/{stat['n']} reached)"
    return f"{stat['mean']:.0f}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


def _batches(sizes: Sequence[int] | None) -> str:
    if not sizes:
        return "-"
    text = ",".join(map(str, sizes))
    return text if len(text) <= 14 else f"{min(sizes)}..{max(sizes)}"


def _pinned(pinned: Mapping[str, float] | None) -> str:
    return "" if not pinned else " (" + ", ".join(f"{LABELS.get(m, m)} at {lr} only" for m, lr in pinned.items()) + ")"


def _count(value: int | None) -> str:
    return "all" if not value else f"{value:,}"


def settings_line(summary: Mapping[str, Any]) -> str:
    """What was trained on what, scored on what, under which budget and schedule."""
    s, budget = summary["settings"], summary["budget"]
    scored = ", ".join(f"{n:,}" for n in summary["results"].get("test_images") or []) or "no"
    split = TEST_SPLITS.get(s["data"], "its test split")
    polish = (f", then {s['polish_epochs']} epochs of end-to-end BP on its deployed exit under the budget (its time "
              "and validations count)") if s.get("polish_epochs") else ""  # fmt: skip
    return (
        f"{s['model']} x{s['width']} on {s['data']}: {_count(s['train_subset'])} training and "
        f"{_count(s['val_subset'])} validation images (held out of the training split); test: {scored} images of "
        f"{split}; budget {budget['text']} ({budget['rule']}); {s['seeds']} seed(s), learning rates "
        f"{', '.join(map(str, s['lrs']))} at batch 128{_pinned(s.get('pinned'))}; BP-trained networks {s['bp_epochs']} epochs (cosine), "
        f"NeuroFlux {s['nf_epochs']} epochs per block{polish}{_extra(s)}; one torch thread per run, {s['jobs']} runs "
        f"at once on {summary['machine']['cpus']} CPU cores."
    )


def override_parts(settings: Mapping[str, Any], whose: Sequence[tuple[str, str]]) -> list[str]:
    """``who `overrides``` for each ``(settings key, who)`` whose overrides are not empty.

    >>> override_parts({"set": [], "local_set": ["a=1", "b=2"]}, (("set", "all"), ("local_set", "NeuroFlux")))
    ['NeuroFlux `a=1 b=2`']
    """
    return [f"{who} `{' '.join(settings[key])}`" for key, who in whose if settings.get(key)]


def _extra(settings: Mapping[str, Any]) -> str:
    """The command line's extra overrides, if any: for every run, NeuroFlux's alone, the scratch-trained exits'."""
    parts = override_parts(settings, (("set", "every run"), ("local_set", "NeuroFlux only"),
                                      ("scratch_set", "scratch-trained exits only")))  # fmt: skip
    return f"; more overrides: {', '.join(parts)}" if parts else ""


def provenance_line(summary: Mapping[str, Any]) -> str:
    """Which code the runs ran, in how many invocations, how many were reused, and the load meanwhile."""
    results, code = summary["results"], summary["provenance"]["code"]
    commits = results["commits"]
    same = commits == [code["commit"]] and not code["dirty"] and not results.get("dirty_runs")
    loads = [r["provenance"]["load"]["mean"] for r in results["runs"] if r.get("provenance")]
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
    reused = results["reused"]
    return (
        f"Code: {', '.join(c[:10] for c in commits)}"
        f"{'' if same else ' (NOT one clean commit: timings may mix code versions)'}; "
        f"{len(results['runs']) - len(reused)} run(s) timed in this invocation, {len(reused)} reused from an "
        f"earlier one of the same code{(': ' + ', '.join(reused)) if reused else ''}; mean 1-minute load during "
        f"the runs {load} on {summary['machine']['cpus']} cores."
    )


def method_row(method: str, stat: Mapping[str, Any], results: Mapping[str, Any], overhead: Mapping[str, Any]) -> str:
    """One method's line of the main table."""
    label = LABELS.get(method, method) + (" + polish" if stat.get("polish") else "")
    if not stat.get("ran"):
        why = (stat.get("cannot_run") or ["failed or not run"])[0]
        return f"| {label} | cannot run: {why} |" + " |" * 9
    if method == "depth_search":
        crossed = ", ".join("-" if u is None else str(u) for u in stat["crossed_units"])
        return (f"| {label} (crossed at unit {crossed}) | {_batches(stat['batch_sizes'])} | {results['lrs'].get(method)} "
                f"| - | {pct(stat['test_acc'])} | - | {seconds(stat['time_to_target'])} | - | "
                f"{seconds(stat['time_to_target'])} | - | - |")  # fmt: skip
    bare = (overhead.get(method) or {}).get("bare_step_seconds")
    harness = stat["harness_step_seconds"]["mean"]
    step = "-" if harness is None else f"{1000 * harness:.1f} ms" + (
        f" / {1000 * bare:.1f} ms ({harness / bare:.1f}x)" if bare else "")
    peak = stat["measured_peak_bytes"]
    units = f" (unit {', '.join(map(str, stat['units']))})" if stat.get("units") else ""
    return (
        f"| {label}{units} | {_batches(stat['batch_sizes'])} | {results['lrs'][method]} | {_converged(stat)} | "
        f"{pct(stat['test_acc'])} | {pct(stat['best_val'])} | {seconds(stat['time_to_target'])} | "
        f"{pct(stat['accuracy_at_equal_time'])} | {seconds(stat['total_seconds'])} | "
        f"{_mb(peak)}{'*' if peak and peak > stat['budget_bytes'] else ''} ({_mb(stat['budget_bytes'])}) | {step} |"
    )


def _converged(stat: Mapping[str, Any]) -> str:
    text = f"{stat['converged']}/{stat['ran']}"
    if stat.get("blocks_converged"):
        text += " (blocks " + ", ".join(f"{k}/{stat['blocks']}" for k in stat["blocks_converged"]) + ")"
    return text


def speedup_lines(results: Mapping[str, Any]) -> list[str]:
    """NeuroFlux's speed-up over each method: ratio of mean times to target, then seed by seed."""
    nf = (results["methods"].get("neuroflux") or {}).get("time_to_target") or {}
    if nf.get("reached") == 0:
        return ["NeuroFlux reached the target in none of its seeds: its deployable model stayed below BP's best "
                "minus one point, so there is no time to that accuracy to compare."]  # fmt: skip
    lines = []
    for method, value in results["speedups"].items():
        seeds = ", ".join(f"seed {s['seed']} {format_speedup(s)}" for s in value["per_seed"]) or "no seed in common"
        lines.append(f"- NeuroFlux vs {LABELS.get(method, method)}: {format_speedup(value['ratio_of_means'])} "
                     f"(ratio of mean times to target; {seeds}; under 1x: NeuroFlux slower)")  # fmt: skip
    return lines


def crossing_lines(summary: Mapping[str, Any]) -> list[str]:
    """When NeuroFlux's deployable model crossed the target, seed by seed, with its test accuracy then."""
    tests = summary.get("crossing_tests") or []
    if not tests:
        return []
    cells = []
    for c in tests:
        if c.get("validation") is None:
            cells.append(f"seed {c['seed']}: never")
            continue
        what = "the polished exit" if c.get("unit") is None else f"exit {c['unit']}"
        test = f"{100 * c['test_acc']:.1f} %" if c.get("test_acc") is not None else "no snapshot"
        cells.append(f"seed {c['seed']}: {what} at {c['seconds']:.0f} s, validation {100 * c['accuracy']:.1f} %, "
                     f"test {test}")  # fmt: skip
    return ["NeuroFlux's crossing (the exit its selection rule deployed at that validation): " + "; ".join(cells) + "."]


def depth_table(stat: Mapping[str, Any] | None) -> list[str]:
    """Depth search: accuracy against depth (mean over the seeds that trained that depth)."""
    if not stat or not stat.get("by_depth"):
        return []
    lines = ["", "Depth search, accuracy against depth (each run stopped at its first crossing):", "",
             "| exit unit | parameters | seeds | best val % | test % |", "| --- | --- | --- | --- | --- |"]
    for d in stat["by_depth"]:
        lines.append(f"| {d['unit']} | {d['parameters'] or 0:,} | {d['seeds']} | {pct(d['best_val'])} | "
                     f"{pct(d['test_acc'])} |")  # fmt: skip
    return lines


FOOTNOTE = (
    "time to target and total: mean over seeds of the wall time from `fit`'s start (profiling and planning "
    "included, loading the data set not) until the first validation at which the model the method would deploy "
    "reached the target (NeuroFlux: the exit its selection rule picks at that validation, then the polished "
    "exit), and until the last validation; `>` when some seed never did (its last validation time counts). "
    "depth search: per seed, scratch exits of depth 0, 1, ... each stopped at its first crossing, the times "
    "summed up to the first depth that crossed. converged: runs whose last fifth of validations gained at most "
    "0.5 points. peak: largest measured training-step peak (`*` above the budget). s/step: wall time of the "
    "training loop per optimizer step against a bare PyTorch loop of the same steps, timed alone."
)


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The benchmark's table and its key lines, as Markdown (``summary.md``)."""
    results = summary["results"]
    target, bp = results["target"], results["methods"].get("bp") or {}
    flags = ", ".join(str(c) for c in bp.get("converged_per_seed") or []) or "-"
    lines = [
        settings_line(summary), "", provenance_line(summary), "",
        f"Target: BP's best validation accuracy minus one point = {'-' if target is None else f'{100 * target:.1f} %'}"
        f" (BP converged per seed: {flags}). Equal wall time: NeuroFlux's mean total time, "
        f"{seconds({'mean': results['equal_time_seconds']})} s.",
        "",
        "| method | batch | lr @128 | converged | test acc % | best val acc % | time to target s | "
        "val acc % at equal time | total s | peak MB (budget) | s/step harness / bare |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    overhead = summary.get("overhead") or {}
    lines += [method_row(m, stat, results, overhead) for m, stat in results["methods"].items()]
    lines += ["", *speedup_lines(results), "", *crossing_lines(summary)]
    lines += depth_table(results["methods"].get("depth_search"))
    lines += _exit_lines(summary)
    return "\n".join([*lines, "", FOOTNOTE])


def _exit_lines(summary: Mapping[str, Any]) -> list[str]:
    results, lines = summary["results"], []
    exit_ = results.get("exits")
    if exit_:
        rows = (summary.get("throughput") or {}).get("rows") or []
        speed = ", ".join(f"{r['speedup']:.2f}x at batch {r['batch_size']}" for r in rows) or "not measured"
        lines.append(
            f"Smallest exit of the block-wise run whose final validation accuracy reached the target (per seed, "
            f"before any polish): unit {exit_['unit']} (reached in {exit_['reached']}/{len(exit_['per_seed'])} "
            f"seeds), {exit_['parameters']:,} parameters against {exit_['full_parameters']:,} "
            f"({exit_['compression']:.1f}x fewer), test accuracy {pct(exit_['test_acc'])} %, inference {speed}."
        )
    polish = (results["methods"].get("neuroflux") or {}).get("polish")
    if polish:
        sizes = ", ".join(f"{p:,}" for p in polish["parameters"] if p)
        lines.append(
            f"Polish ({polish['epochs']} epochs of end-to-end BP on the deployed exit, in NeuroFlux's row): units "
            f"{', '.join(map(str, polish['units']))} at batch {', '.join(map(str, polish['batch_sizes']))}, {sizes} "
            f"parameters against {polish['full_parameters']:,}; validation {pct(polish['val_before'])} -> "
            f"{pct(polish['val_after'])} %, test {pct(polish['blockwise_test_acc'])} -> {pct(polish['test_acc'])} %, "
            f"kept in {polish['kept']}/{len(polish['units'])} seeds, {seconds(polish['seconds'])} s."
        )
    ahead = [h for h in results.get("head_start") or [] if h["scratch_seconds"] is not None]
    if ahead:
        lines.append(
            "What the block-wise phase bought (the block holding the deployed unit ended, its exit's validation then; "
            "when `scratch_exit`, the same unit by BP, first reached it): "
            + "; ".join(f"seed {h['seed']}: unit {h['unit']} at {h['ready_seconds']:.0f} s with "
                        f"{100 * h['val']:.1f} %, scratch at {h['scratch_seconds']:.0f} s" for h in ahead)
            + "."
        )
    return ["", *lines] if lines else []
