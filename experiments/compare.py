"""BP vs classic LL vs NeuroFlux under memory budgets (the paper's §6.2, Figures 11-13).

For one model and data set, trains every method at every budget in one
invocation, on the same data with the same recipe (``conf/``: one ``optim``
block, linear learning-rate scaling from ``optim.reference_batch`` for every
method, ``epochs`` per unit of depth), each run through ``nf-train``'s
``run()`` into its own directory. Then it compares them by *time to target
accuracy*: the wall time (``results.json``'s ``history``, whose clock starts
when ``fit`` sets up, so NeuroFlux's profiling and planning count) after which
some exit of the run has reached the target validation accuracy. A BP run has
one exit, the model's head; a local-learning run has one per unit and is
credited with the best exit evaluated so far.

    python experiments/compare.py                                  # the CPU default (experiments/README.md)
    python experiments/compare.py --budgets 100MB 300MB 500MB --width 1 --train-subset 0 --epochs 10
    python experiments/compare.py --reuse --target 0.35            # re-summarise finished runs
    python experiments/compare.py --set data.num_workers=2         # any nf-train override, for every run

Writes into ``--out``: ``runs/<budget>_<method>/results.json`` (plus the run's
logs, cache and export), ``summary.json``, ``summary.csv`` and the figures of
``figures.py``. A plain argparse script rather than a Hydra app: one
invocation spans many configurations and must summarise them together, which a
Hydra job (one configuration) or a sweep (no step after its jobs) does not
offer; each run's configuration is still composed by Hydra from ``conf/``,
and ``--set`` passes nf-train overrides through.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import figures
import torch
from omegaconf import DictConfig

from nf_lightning import models
from nf_lightning.cli.common import compose_config as compose_app_config
from nf_lightning.cli.train import run
from nf_lightning.core.budget import format_bytes, parse_bytes
from nf_lightning.data import KNOWN_DATASETS

REPO = Path(__file__).resolve().parents[1]
TARGET_MARGIN = 0.01
"""The default target is BP's final accuracy at the most generous budget minus this (one point)."""
METHODS = ("bp", "classic_ll", "neuroflux")
"""The compared methods (configs in ``conf/method``)."""
EXIT_ACCURACY_PREFIX = "neuroflux/acc_exit_"
HEAD_ACCURACY = "val/acc"
CSV_FIELDS = (
    "budget", "budget_bytes", "method", "could_run", "batch_sizes", "train_seconds", "time_to_target_seconds",
    "measured_peak_bytes", "best_accuracy", "exported_parameters", "exported_accuracy", "exported_from",
    "target_exit_parameters", "speedup_vs_bp", "speedup_vs_classic_ll", "reason",
)


class Speedup(NamedTuple):
    """How many times faster NeuroFlux reached the target than a baseline at the same budget.

    ``lower_bound`` is set when the baseline never reached the target: it would
    have needed more than the time of its last validation, so the true
    speed-up is at least ``value``.
    """

    value: float
    lower_bound: bool

    def __str__(self) -> str:
        return f"{'>' if self.lower_bound else ''}{self.value:.2f}x"


# --------------------------------------------------------------------------- time to target (pure)
def record_accuracy(record: dict[str, Any]) -> float | None:
    """The best accuracy of any exit in one ``history`` record (``None`` if it holds none)."""
    values = [v for k, v in record.items() if k == HEAD_ACCURACY or k.startswith(EXIT_ACCURACY_PREFIX)]
    return max(values) if values else None


def accuracy_curve(history: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """``(seconds, accuracy reached by then)`` per validation: the best exit accuracy evaluated up to that time.

    >>> accuracy_curve([{"seconds": 1.0, "val/acc": 0.3}, {"seconds": 2.0, "val/acc": 0.2}])
    [(1.0, 0.3), (2.0, 0.3)]
    """
    curve: list[tuple[float, float]] = []
    best = -math.inf
    for record in sorted(history, key=lambda r: r["seconds"]):
        accuracy = record_accuracy(record)
        if accuracy is not None:
            best = max(best, accuracy)
            curve.append((record["seconds"], best))
    return curve


def time_to_target(history: Sequence[dict[str, Any]], target: float) -> float | None:
    """Seconds until the accuracy reached (see :func:`accuracy_curve`) is at least ``target``; ``None`` if never.

    >>> history = [{"seconds": 5.0, "neuroflux/acc_exit_0": 0.4}, {"seconds": 9.0, "neuroflux/acc_exit_1": 0.6}]
    >>> time_to_target(history, 0.5)
    9.0
    """
    return next((seconds for seconds, accuracy in accuracy_curve(history) if accuracy >= target), None)


def default_target(runs: Sequence[dict[str, Any]], margin: float = TARGET_MARGIN) -> float:
    """BP's final accuracy at the most generous budget it ran under, minus ``margin``.

    Raises ``ValueError`` when BP ran at no budget (then give the target explicitly).
    """
    bp_runs = [r for r in runs if r["method"] == "bp" and r["could_run"]]
    if not bp_runs:
        raise ValueError("BP ran at no budget, so there is no default target accuracy; pass --target")
    most_generous = max(bp_runs, key=lambda r: r["budget_bytes"])
    return most_generous["final_accuracy"] - margin


def speedup(baseline: dict[str, Any], neuroflux: dict[str, Any]) -> Speedup | None:
    """NeuroFlux's speed-up to the target over ``baseline`` (two summary rows of one budget).

    ``None`` when either could not run or NeuroFlux never reached the target.
    A baseline that ran but never reached it gives a lower bound: the time of
    its last validation over NeuroFlux's time to target.
    """
    nf_seconds = neuroflux.get("time_to_target_seconds")
    if not (baseline["could_run"] and neuroflux["could_run"]) or nf_seconds is None:
        return None
    base_seconds = baseline["time_to_target_seconds"]
    if base_seconds is None:
        last_validation = baseline["curve"][-1][0]
        return Speedup(last_validation / nf_seconds, lower_bound=True)
    return Speedup(base_seconds / nf_seconds, lower_bound=False)


# --------------------------------------------------------------------------- summary rows (pure)
def summarize_run(results: dict[str, Any], target: float, full_parameters: int) -> dict[str, Any]:
    """One row of the comparison from a run's ``results.json``."""
    row: dict[str, Any] = {
        "method": results["method"],
        "budget": results["budget"],
        "budget_bytes": results["budget_bytes"],
        "could_run": results["could_run"],
        "reason": results.get("reason"),
    }
    if not results["could_run"]:
        return row
    exported = results.get("exit")
    curve = accuracy_curve(results["history"])
    row.update(
        batch_sizes=results["batch_sizes"],
        train_seconds=results["train_seconds"],
        time_to_target_seconds=time_to_target(results["history"], target),
        measured_peak_bytes=results.get("measured_peak_bytes"),
        best_accuracy=curve[-1][1] if curve else None,
        final_accuracy=results["final_accuracy"],
        exported_parameters=exported["parameters"] if exported else full_parameters,
        exported_accuracy=exported["accuracy"] if exported else results["final_accuracy"],
        exported_from="exit" if exported else "full model",
        target_exit_parameters=smallest_exit_at_target(results, target, full_parameters),
        curve=curve,
    )
    return row


def smallest_exit_at_target(results: dict[str, Any], target: float, full_parameters: int) -> int | None:
    """Fewest parameters of an exit whose final accuracy reaches ``target``; ``None`` if none does.

    A run without exits (BP) has one, the full model, at its final accuracy.

    >>> exits = [{"unit": 0, "accuracy": 0.3, "parameters": 10}, {"unit": 1, "accuracy": 0.5, "parameters": 40},
    ...          {"unit": 2, "accuracy": 0.6, "parameters": 90}]
    >>> smallest_exit_at_target({"exit": {"exits": exits}}, 0.45, 100)
    40
    """
    exported = results.get("exit")
    if exported:
        candidates = [(e["accuracy"], e["parameters"]) for e in exported["exits"]]
    else:
        candidates = [(results["final_accuracy"], full_parameters)]
    return min((params for accuracy, params in candidates if accuracy >= target), default=None)


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Give each NeuroFlux row its speed-ups over BP and classic LL at the same budget."""
    by_key = {(r["budget"], r["method"]): r for r in rows}
    for row in rows:
        if row["method"] != "neuroflux":
            continue
        for baseline in ("bp", "classic_ll"):
            other = by_key.get((row["budget"], baseline))
            ratio = speedup(other, row) if other is not None else None
            row[f"speedup_vs_{baseline}"] = ratio._asdict() if ratio else None


# --------------------------------------------------------------------------- runs
def compose_config(method: str, budget: str, args: argparse.Namespace) -> DictConfig:
    """nf-train's configuration for one run of the comparison."""
    overrides = [
        f"method={method}",
        f"model={args.model}",
        f"model.width_mult={args.width}",
        f"data={args.data}",
        f"data.train_subset={args.train_subset or 'null'}",
        f"data.val_subset={args.val_subset or 'null'}",
        f"budget={budget}",
        f"epochs={args.epochs}",
        f"batch_limit={args.batch_limit}",
        f"seed={args.seed}",
        "trainer.enable_progress_bar=false",
        *args.set,
    ]
    return compose_app_config("train", overrides)


def run_dir(out: Path, budget: str, method: str) -> Path:
    return out / "runs" / f"{budget}_{method}"


def run_or_reuse(cfg: DictConfig, directory: Path, reuse: bool) -> dict[str, Any]:
    """Train as ``cfg`` says into ``directory``, or read the run already there when ``reuse`` is set."""
    written = directory / "results.json"
    if reuse and written.is_file():
        print(f"[compare] reusing {written}")
        return json.loads(written.read_text())
    print(f"[compare] {cfg.method.name} @ {cfg.budget} -> {directory}")
    return run(cfg, directory)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads (``0``: leave them as they are), then restore them."""
    before = torch.get_num_threads()
    torch.set_num_threads(count or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def full_model_parameters(cfg: DictConfig) -> int:
    """Parameters of the whole configured model (what BP, or a run without an exported exit, delivers)."""
    num_classes = KNOWN_DATASETS[cfg.data.name].num_classes
    net = models.create(cfg.model.name, num_classes=num_classes, width_mult=cfg.model.width_mult)
    return sum(p.numel() for p in net.parameters())


# --------------------------------------------------------------------------- output
def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` (everything) and ``summary.csv`` (one line per run, without curves)."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in summary["rows"]:
            writer.writerow({key: _csv_value(row.get(key)) for key in CSV_FIELDS})


def _csv_value(value: Any) -> Any:
    if isinstance(value, dict) and "lower_bound" in value:
        return str(Speedup(**value))
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "" if value is None else value


def format_table(rows: Sequence[dict[str, Any]], target: float) -> str:
    """The comparison as a person reads it: one line per budget and method."""
    header = (
        f"{'budget':>8} {'method':<11}{'batch':>13}{'train s':>9}{'to target s':>12}{'peak':>10}"
        f"{'best acc':>9}{'exported':>10}{'exp acc':>8}{'at target':>10}{'BP/NF':>8}{'LL/NF':>8}"
    )
    notes = (
        "exported: parameters of the selected exit (the full model without one); at target: fewest parameters of "
        "an exit reaching the target; BP/NF, LL/NF: how many times faster NeuroFlux reached the target; "
        "*: measured peak above the budget"
    )
    lines = [f"target accuracy {target:.2%}", header, "-" * len(header)]
    for row in rows:
        if not row["could_run"]:
            lines.append(f"{row['budget']:>8} {row['method']:<11}  cannot run: {row['reason']}")
            continue
        lines.append(
            f"{row['budget']:>8} {row['method']:<11}{_batches(row['batch_sizes']):>13}{row['train_seconds']:>9.1f}"
            f"{_optional(row['time_to_target_seconds'], '{:.1f}', 'not reached'):>12}"
            f"{_peak(row):>10}"
            f"{row['best_accuracy']:>9.2%}{row['exported_parameters']:>10,}{row['exported_accuracy']:>8.2%}"
            f"{_optional(row['target_exit_parameters'], '{:,}', '-'):>10}"
            f"{_speedup_cell(row.get('speedup_vs_bp')):>8}{_speedup_cell(row.get('speedup_vs_classic_ll')):>8}"
        )
    return "\n".join([*lines, notes])


def _batches(sizes: Sequence[int]) -> str:
    text = ",".join(map(str, sizes))
    return text if len(text) <= 12 else f"{min(sizes)}..{max(sizes)}"


def _optional(value: Any, fmt: Any, missing: str) -> str:
    if value is None:
        return missing
    return fmt(value) if callable(fmt) else fmt.format(value)


def _peak(row: dict[str, Any]) -> str:
    peak = row["measured_peak_bytes"]
    if peak is None:
        return "-"
    return format_bytes(peak) + ("*" if peak > row["budget_bytes"] else "")


def _speedup_cell(value: dict[str, Any] | None) -> str:
    return "" if value is None else str(Speedup(**value))


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg11", help="a conf/model entry")
    parser.add_argument("--width", type=float, default=0.25, help="model.width_mult")
    parser.add_argument("--data", default="cifar10_folder", help="a conf/data entry")
    parser.add_argument(
        "--budgets", nargs="+", default=["5MB", "10MB", "20MB", "40MB"],
        help="memory budgets (nf-plan shows what runs under each)",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--epochs", type=int, default=5, help="epochs per unit of depth (nf-train's `epochs`)")
    parser.add_argument("--train-subset", type=int, default=5000, help="class-balanced training images (0: all)")
    parser.add_argument("--val-subset", type=int, default=1000, help="class-balanced validation images (0: all)")
    parser.add_argument("--batch-limit", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads for every run (0: torch's default). On a shared CPU more threads than free cores "
        "make OpenMP spin; one thread keeps small steps fast and timings comparable",
    )
    parser.add_argument(
        "--target", type=float, default=None,
        help=f"target validation accuracy, a fraction (default: BP's final accuracy at the most generous "
        f"budget minus {TARGET_MARGIN})",
    )
    parser.add_argument(
        "--curve-budget", default=None,
        help="budget of the accuracy-vs-time figure (default: the tightest budget at which the most methods ran)",
    )
    parser.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="more nf-train overrides, for every run",
    )
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "out" / "compare")
    parser.add_argument("--reuse", action="store_true", help="read runs whose results.json exists instead of training")
    args = parser.parse_args(argv)
    if args.target is None and "bp" not in args.methods:
        parser.error("without BP in --methods there is no default target accuracy; pass --target")
    return args


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every method at every budget, tightest budget first; each run's ``results.json`` contents."""
    runs = []
    with torch_threads(args.threads):
        for budget in sorted(args.budgets, key=parse_bytes):  # methods interleaved: drifting load hits all alike
            for method in args.methods:
                cfg = compose_config(method, budget, args)
                runs.append(run_or_reuse(cfg, run_dir(args.out, budget, method), args.reuse))
    return runs


def summarize(args: argparse.Namespace, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The comparison's summary: settings, target, one row per run with the speed-ups."""
    full_parameters = full_model_parameters(compose_config(args.methods[0], args.budgets[0], args))
    if args.target is None:
        target, rule = default_target(runs), f"BP's final accuracy at its most generous budget - {TARGET_MARGIN}"
    else:
        target, rule = args.target, "given"
    rows = [summarize_run(r, target, full_parameters) for r in runs]
    add_speedups(rows)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {"settings": settings, "target_accuracy": target, "target_rule": rule, "rows": rows}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison; write the summary and figures, print the table; return the summary."""
    args = parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = summarize(args, run_all(args))
    written = figures.write_all(summary, args.out, args.curve_budget)
    summary["figures"] = [str(path.relative_to(args.out)) for path in written]
    summary["seconds"] = time.perf_counter() - start
    write_summary(args.out, summary)
    print(f"\n{format_table(summary['rows'], summary['target_accuracy'])}")
    print(f"\nfigures: {', '.join(summary['figures'])}")
    print(f"total {summary['seconds']:.0f} s -> {args.out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
