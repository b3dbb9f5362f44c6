"""Reliability report: every fault injected across processes, the cold-cache race and
the soak, at the full counts (8 processes; 100k forward and 10k forward+backward calls), printed
as markdown. ``--json FILE`` saves the figures; ``--processes/--calls/--grad-calls`` change the
counts. Exits 1 if any check fails.

The scenarios themselves are ``tests/reliability_helpers.py``, which ``tests/test_load.py`` and
``tests/test_faults.py`` run at small counts: this script only runs them and formats the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import reliability_helpers as scenarios  # noqa: E402  (tests/ holds the shared scenarios)

COLUMNS = ("injected", "detected", "rebuilt", "correct", "clean")
MIB = 1 << 20


def verdict(checks: dict[str, bool], column: str | None = None) -> str:
    """'yes' if every check (of ``column``: names ``'<column>: ...'``) passed, else the failed."""
    chosen = {name: ok for name, ok in checks.items()
              if column is None or name.split(":", 1)[0] == column}
    failed = [name for name, ok in chosen.items() if not ok]
    if not chosen:
        return "-"
    return "yes" if not failed else "NO: " + "; ".join(failed)


def fault_rows(results: dict[str, dict]) -> list[str]:
    rows = ["| fault | " + " | ".join(COLUMNS) + " | max error | notes |",
            "|---|" + "---|" * (len(COLUMNS) + 2)]
    for name, result in results.items():
        figures = result["figures"]
        note = ""
        if "served_after_kill_s" in figures:
            note = f"waiter served {figures['served_after_kill_s']:.1f} s after the kill"
        elif "fallback_error" in figures:
            note = f"fallback to torch: error {figures['fallback_error']:.1e}, warned"
        rows.append(f"| {name} | " + " | ".join(verdict(result["checks"], c) for c in COLUMNS)
                    + f" | {figures['max_error']:.1e} | {note} |")
    return rows


def race_rows(result: dict) -> list[str]:
    f = result["figures"]
    return ["| processes | kernels | compiles (total) | compiles per process | max error | "
            "wall s | checks |", "|---|---|---|---|---|---|---|",
            f"| {f['processes']} | {f['kernels']} | {f['compiles_total']} | "
            f"{', '.join(map(str, f['compiles_per_process']))} | {f['max_error']:.1e} | "
            f"{f['wall_s']:.1f} | {verdict(result['checks'])} |"]


def soak_rows(result: dict) -> list[str]:
    rows = ["| loop | calls | RSS before MiB | RSS after MiB | growth KiB | fds before -> after "
            "| calls/s |", "|---|---|---|---|---|---|---|"]
    for name, loop in result["figures"]["loops"].items():
        rows.append(f"| {name} | {loop['calls']} | {loop['rss_before'] / MIB:.1f} | "
                    f"{loop['rss_after'] / MIB:.1f} | "
                    f"{(loop['rss_after'] - loop['rss_before']) / 1024:+.0f} | "
                    f"{loop['fds_before']} -> {loop['fds_after']} | {loop['calls_per_s']:.0f} |")
    rows.append(f"\nmax error after the loops {result['figures']['max_error']:.1e}; "
                f"checks: {verdict(result['checks'])} (RSS noise threshold "
                f"{scenarios.RSS_NOISE_BYTES / MIB:.0f} MiB)")
    return rows


def run(processes: int, calls: int, grad_calls: int) -> dict:
    """Every scenario, each in its own fresh cache; their results and timings."""
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "counts": {"processes": processes, "calls": calls, "grad_calls": grad_calls},
              "faults": {}, "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="zeroskip-reliability-") as scratch_root:
        root = Path(scratch_root)
        for number, (name, scenario) in enumerate(scenarios.FAULTS.items()):
            scratch = root / f"fault-{number}"
            scratch.mkdir()
            start = time.perf_counter()
            report["faults"][name] = scenario(scratch / "cache", scratch)
            report["seconds"][name] = time.perf_counter() - start
        start = time.perf_counter()
        report["race"] = scenarios.race(root / "race" / "cache", processes)
        report["seconds"]["race"] = time.perf_counter() - start
        start = time.perf_counter()
        report["soak"] = scenarios.soak(root / "soak" / "cache", calls, grad_calls)
        report["seconds"]["soak"] = time.perf_counter() - start
    results = [*report["faults"].values(), report["race"], report["soak"]]
    report["passed"] = all(all(r["checks"].values()) for r in results)
    return report


def markdown(report: dict) -> str:
    counts = report["counts"]
    lines = ["# zeroskip reliability", "",
             f"{report['machine']['cpus']} CPUs, Python {report['machine']['python']}, "
             f"{report['machine']['platform']}; total {sum(report['seconds'].values()):.0f} s",
             "", "## Faults (each injected into a warm cache, met by a new process)", "",
             *fault_rows(report["faults"]), "",
             f"## Cold-cache race ({counts['processes']} processes released together, each "
             "converting the same model, forward and backward)", "",
             *race_rows(report["race"]), "",
             f"## Soak (one cached conv2d: {counts['calls']} forward calls, "
             f"{counts['grad_calls']} forward+backward calls, fresh process)", "",
             *soak_rows(report["soak"]), "",
             "All checks passed." if report["passed"] else "SOME CHECKS FAILED."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--grad-calls", type=int, default=10_000)
    parser.add_argument("--json", metavar="FILE", help="save the figures as JSON")
    args = parser.parse_args(argv)
    report = run(args.processes, args.calls, args.grad_calls)
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
