"""The README's benchmark section, generated from the committed summaries of both data sets (never by hand).

It opens with NeuroFlux's standing against the smaller networks a user would
train instead (a scratch-trained exit, a depth search), then against the whole
network (BP, BP with checkpointing), in each the comparisons NeuroFlux loses
first; then one headline table per data set.
Only summaries with per-run provenance (this benchmark's format) are accepted.

Example:
    >>> verdict("CIFAR-10", "depth search", {"value": 0.8, "bound": "="}, -0.004)
    (True, 'on CIFAR-10 against depth search: 0.80x as fast to the target (slower), test -0.4 points')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nf_lightning.benchmark.presets import LABELS
from nf_lightning.benchmark.report import BASELINES, README_BEGIN, README_END, pct, seconds
from nf_lightning.benchmark.stats import format_speedup


def verdict(data: str, label: str, value: Mapping[str, Any] | None, gap: float | None) -> tuple[bool, str]:
    """``(NeuroFlux lost, sentence)``: lost unless it was surely sooner to the target and not below on test.

    A bound (a seed that never reached the target) that leaves both sides of 1x open is no win, and says so:

    >>> verdict("TIN", "BP", {"value": 2.8, "bound": "<"}, 0.02)[0]
    True
    >>> verdict("TIN", "BP", {"value": 2.8, "bound": "<"}, 0.02)[1]
    'on TIN against BP: <2.80x as fast to the target (at most: NeuroFlux missed the target in a seed), test +2.0 points'
    """
    if value is None or value.get("value") is None:
        return True, f"on {data} against {label}: no time to the target to compare"
    ratio, bound = value["value"], value["bound"]
    slower = ratio < 1.0 if bound == "=" else (bound == "<" and ratio <= 1.0)
    sooner = ratio >= 1.0 if bound == "=" else (bound == ">" and ratio >= 1.0)
    lost = not sooner or (gap is not None and gap < 0)
    test = "" if gap is None else f", test {100 * gap:+.1f} points"
    open_bound = " (at most: NeuroFlux missed the target in a seed)" if bound == "<" else (
        " (at least: the baseline missed the target in a seed)")
    note = " (slower)" if slower else "" if sooner else open_bound
    return lost, f"on {data} against {label}: {format_speedup(value)} as fast to the target{note}{test}"


def opening(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Two sentences: NeuroFlux against the smaller networks a user would train instead (``scratch_exit``,
    ``depth_search``), then against the whole network (BP, BP-ckpt); in each, the comparisons it loses first."""
    sentences = []
    for lead, methods in (("Against a smaller network trained by BP", BASELINES[:2]),
                          ("Against the whole network", BASELINES[2:])):  # fmt: skip
        losses, wins = [], []
        for data, summary in summaries.items():
            results = summary["results"]
            nf_test = ((results["methods"].get("neuroflux") or {}).get("test_acc") or {}).get("mean")
            for method in (m for m in methods if m in results["methods"]):  # a method not run is not compared
                test = ((results["methods"].get(method) or {}).get("test_acc") or {}).get("mean")
                gap = None if nf_test is None or test is None else nf_test - test
                value = (results["speedups"].get(method) or {}).get("ratio_of_means")
                lost, text = verdict(data, LABELS[method], value, gap)
                (losses if lost else wins).append(text)
        parts = ([f"NeuroFlux loses {'; '.join(losses)}"] if losses else []) + (
            [f"{'it' if losses else 'NeuroFlux'} wins {'; '.join(wins)}"] if wins else [])
        sentences.append(f"{lead}: {', while '.join(parts)}.")
    return " ".join(sentences)


def headline(data: str, summary: Mapping[str, Any], path: str) -> list[str]:
    """One data set's headline table: NeuroFlux and the baselines, time to target, test accuracy, speed-up."""
    results = summary["results"]
    target = results["target"]
    lines = [f"**{data}** (`{path}`; target {'-' if target is None else f'{100 * target:.1f} %'} validation):", "",
             "| method | test acc % | time to target s | NeuroFlux's speed-up (ratio of means; per seed) | total s |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for method in ("neuroflux", *BASELINES):
        stat = results["methods"].get(method)
        if stat is None:
            continue
        value = results["speedups"].get(method)
        speed = "-" if value is None else (format_speedup(value["ratio_of_means"]) + "; "
                                           + ", ".join(format_speedup(s) for s in value["per_seed"]))  # fmt: skip
        total = stat.get("total_seconds") or stat.get("time_to_target")
        lines.append(f"| {LABELS[method]} | {pct(stat.get('test_acc'))} | {seconds(stat.get('time_to_target'))} | "
                     f"{speed} | {seconds(total)} |")  # fmt: skip
    return lines


def readme_section(summaries: Mapping[str, tuple[Mapping[str, Any], str]],
                   missing: Mapping[str, str] | None = None) -> str:
    """The section between the README's markers, from ``{data set label: (summary, its path)}``; each data set in
    ``missing`` (label: the path its summary will have) is named as not yet measured."""
    from nf_lightning.benchmark.report import markdown_table

    paths = ", ".join(path for _, path in summaries.values())
    lines = [f"<!-- generated by `python experiments/compare.py --readme` from {paths}; do not edit -->", "",
             opening({data: summary for data, (summary, _) in summaries.items()}), ""]  # fmt: skip
    for data, path in (missing or {}).items():
        lines += [f"**{data}: not yet measured** by this benchmark (no `{path}`; `experiments/README.md`, "
                  "\"The long runs\", gives the command). Nothing above is about it.", ""]
    for data, (summary, path) in summaries.items():
        lines += [*headline(data, summary, path), ""]
    for data, (summary, path) in summaries.items():
        lines += [f"<details><summary>{data}: the full table</summary>", "", markdown_table(summary), "", "</details>",
                  ""]  # fmt: skip
    return "\n".join(lines)


def replace_readme_section(text: str, section: str) -> str:
    """``text`` with everything between the ``compare`` markers replaced by ``section``.

    >>> replace_readme_section("a\\n<!-- compare:begin -->\\nold\\n<!-- compare:end -->\\nb", "new")
    'a\\n<!-- compare:begin -->\\nnew\\n<!-- compare:end -->\\nb'
    """
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < 0 or end < begin:
        raise SystemExit(
            f"README markers not found: the benchmark table goes between a line '{README_BEGIN}' and a later "
            f"line '{README_END}'; add both to the README first"
        )
    return f"{text[: begin + len(README_BEGIN)]}\n{section.strip()}\n{text[end:]}"


def load_summary(path: Path) -> dict[str, Any]:
    """A summary written by this benchmark; one from before per-run provenance is refused."""
    if not path.is_file():
        raise SystemExit(f"no summary at {path}: run the benchmark first (see experiments/README.md)")
    summary = json.loads(path.read_text())
    if "provenance" not in summary or "scratch_exit" not in summary["results"]["methods"]:
        raise SystemExit(f"{path} is from the previous benchmark (no per-run provenance or no scratch_exit): "
                         "rerun it before generating the README from it")  # fmt: skip
    return summary


def shown_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when it lies there, else as given.

    >>> shown_path(Path("/repo/experiments/x"), Path("/repo")), shown_path(Path("/tmp/x"), Path("/repo"))
    ('experiments/x', '/tmp/x')
    """
    return path.resolve().relative_to(root).as_posix() if path.resolve().is_relative_to(root) else str(path)


def update_readme(summary_paths: Mapping[str, Path], readme: Path, root: Path) -> None:
    """Regenerate ``readme``'s section from ``{data set label: summary.json}`` (paths shown relative to ``root``)."""
    summaries, missing = {}, {}
    for data, path in summary_paths.items():
        shown = shown_path(path, root)
        if path.exists() or len(missing) == len(summary_paths) - 1:  # at least one data set, or load_summary says why
            summaries[data] = (load_summary(path), shown)
        else:
            missing[data] = shown
    readme.write_text(replace_readme_section(readme.read_text(), readme_section(summaries, missing)))
    print(f"[compare] {readme}: benchmark section regenerated from {', '.join(s for _, s in summaries.values())}")
