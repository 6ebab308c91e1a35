"""summary.txt of a bench/gpu_check.sh OUT folder, from whatever it holds now (docs/benchmarks.md section 5).

    python bench/gpu_summary.py OUT [--plot]     # writes OUT/summary.txt (printed with --plot)
    python bench/gpu_summary.py OUT --tests-only  # prints the gpu tests' lines of OUT/tests.txt alone

gpu_check.sh rewrites it after every step and every 15 s while one runs, so a run killed at any moment leaves a
current summary. It reads env.txt, results.csv (every benchmark row), tests.txt (pytest -v output, possibly cut off
mid-run) and steps.csv. The test counts come from pytest's per-test lines themselves (serial or pytest-xdist), never
from its header ("collected ... / ... selected") or its closing tally, which a killed run never writes; the tests
that were running when the output stopped are named (one, or one per pytest-xdist worker). Standard library only
(the plot, where asked, imports empssl): the summary is written even when the install failed.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from typing import Dict, List, Tuple

OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
_ALTERNATIVES = "|".join(OUTCOMES)
# pytest -v: "tests/test_x.py::test_y[p] PASSED   [ 10%]" (SKIPPED and XFAIL with "(reason)");
# with pytest-xdist: "[gw3] [ 10%] PASSED tests/test_x.py::..."
SERIAL = re.compile(rf"^(tests/\S.*?) ({_ALTERNATIVES})(?: \(.*\))?(?: +\[ *\d+%\])?\s*$", re.M)
XDIST = re.compile(rf"^\[gw\d+\] \[ *\d+%\] ({_ALTERNATIVES}) (tests/\S.*?)\s*$", re.M)
# pytest -v prints the id when a test starts (with pytest-xdist too: a line of its own per test a worker starts)
STARTED = re.compile(r"^(tests/\S+::\S+)[ \t]*$", re.M)
TALLY = re.compile(r"^=+ (.*\b(?:passed|failed|errors?|skipped)\b.* in [0-9.]+s.*?) =+$", re.M)


def test_outcomes(text: str) -> List[Tuple[str, str]]:
    """(node id, outcome) of every per-test line in pytest -v output, in order (a teardown ERROR is its own line)."""
    found = [(m.start(), m.group(1), m.group(2)) for m in SERIAL.finditer(text)]
    found += [(m.start(), m.group(2), m.group(1)) for m in XDIST.finditer(text)]
    return [(nodeid, outcome) for _, nodeid, outcome in sorted(found)]


def tests_summary(text: str) -> List[str]:
    """The summary's lines for a tests.txt: counts by outcome from the per-test lines, pytest's own closing tally
    when it got that far, the failed tests, and the test running when the output stops."""
    outcomes = test_outcomes(text)
    counts: Dict[str, int] = {}
    for _, outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    tally = TALLY.findall(text)
    finished = f"pytest's tally: {tally[-1]}" if tally else "no pytest tally: stopped early or still running"
    shown = ", ".join(f"{counts[o]} {o.lower()}" for o in OUTCOMES if o in counts) or "none finished"
    lines = [f"gpu tests: {shown} (counted from the test lines; {finished})"]
    groups = re.findall(r"^gpu test groups in order.*$", text, re.M)
    if groups:
        lines.append("  " + groups[-1])
    failed = sorted({nodeid for nodeid, outcome in outcomes if outcome in ("FAILED", "ERROR")})
    lines += [f"  FAILED {nodeid}" for nodeid in failed[:12]]
    if len(failed) > 12:
        lines.append(f"  ... {len(failed) - 12} more")
    collected = re.findall(r"^(\d+)(?:/\d+)? tests? collected", text, re.M)
    if collected and not outcomes:  # a rehearsal: collected, nothing run
        return [f"gpu tests collected, none run: {' + '.join(collected)}"] + lines[1:]
    running = _running_at_end(text, {nodeid for nodeid, _ in outcomes})
    if running and not tally:
        lines.append(f"  stopped in (or still running): {'; '.join(running)}")
    return lines


def _running_at_end(text: str, finished: set) -> List[str]:
    """The tests started and not finished when the output ends, in the order they started."""
    started = [m.group(1) for m in STARTED.finditer(text)]
    if not started:  # serial: the id and the start of its own output share the line when a test is cut off
        lines = [line for line in text.splitlines() if line.startswith("tests/") and "::" in line]
        started = [lines[-1].split()[0]] if lines else []
    return [nodeid for nodeid in dict.fromkeys(started) if nodeid not in finished]


def _readable(ms: str) -> str:
    seconds = float(ms) / 1e3
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return (
        f"{seconds:.3g} s"
        if seconds < 120
        else f"{seconds / 60:.3g} min"
        if seconds < 7200
        else f"{seconds / 3600:.3g} h"
    )


def results_summary(rows: List[Dict[str, str]]) -> List[str]:
    if not rows:
        return []
    lines = [f"device: {rows[0]['device']} | {rows[0]['versions']}"]
    lines.append(
        f"{'bench':8s} {'case':30s} {'method':48s} {'dtype':8s} {'time':>9s} {'rate':>10s} {'unit':13s} {'limit':>6s}"
    )
    shown = rows[:56]
    for r in shown:
        head = f"{r['bench']:8s} {r['case'][:30]:30s} {r['method'][:48]:48s} {r['dtype'][:8]:8s}"
        if r.get("error"):
            lines.append(f"{head} FAILED: {r['error'][:80]}")
            continue
        fraction = f"{float(r['limit_fraction']):.1%}" if r["limit_fraction"] else ""
        lines.append(
            f"{head} {_readable(r['ms']):>9s} {float(r['rate']):10.4g} {r['rate_unit'][:13]:13s} {fraction:>6s}"
        )
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more rows in results.csv")
    notes = [f"  {r['method'][:48]}: {r['note']}" for r in rows if r["bench"] == "epoch" and r.get("note")]
    return lines + (["epoch notes:"] + notes if notes else [])


def summarise(out: str, plot: bool = False) -> str:
    """Write OUT/summary.txt (whole, then renamed: never half a summary) and return its text."""
    lines: List[str] = []
    env = os.path.join(out, "env.txt")
    if os.path.exists(env):
        with open(env) as f:
            lines += [line.rstrip() for line in f if line.strip()][:4]
    rows: List[Dict[str, str]] = []
    path = os.path.join(out, "results.csv")
    if os.path.exists(path):
        with open(path) as f:
            # a row cut off by a kill lacks its last columns
            rows = [row for row in csv.DictReader(f) if None not in row.values()]
    lines += results_summary(rows)
    if rows and plot:
        try:
            sys.path.insert(0, os.getcwd())
            from empssl.bench.common import plot_rows

            plot_rows(rows, os.path.join(out, "results.png"), f"{rows[0]['device']} | {rows[0]['versions']}")
        except Exception as err:  # noqa: BLE001  the plot is a convenience; the CSV is the record
            lines.append(f"no plot: {type(err).__name__}: {err}")
    tests = os.path.join(out, "tests.txt")
    if os.path.exists(tests):
        with open(tests, errors="replace") as f:
            lines += tests_summary(f.read())
    steps_path = os.path.join(out, "steps.csv")
    if os.path.exists(steps_path):
        with open(steps_path) as f:
            steps = list(csv.DictReader(f))
        lines.append(
            "steps: "
            + ", ".join(
                f"{s['step']} {'ok' if s['exit'] == '0' else 'EXIT ' + s['exit']} {s['seconds']}s/{s['limit']}s"
                for s in steps
            )
        )
    text = "\n".join(lines) + "\n"
    temporary = os.path.join(out, f".summary.{os.getpid()}.tmp")
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, os.path.join(out, "summary.txt"))
    return text


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if "--tests-only" in arguments[1:]:
        with open(os.path.join(arguments[0], "tests.txt"), errors="replace") as handle:
            print("\n".join(tests_summary(handle.read())))
        raise SystemExit(0)
    text = summarise(arguments[0], plot="--plot" in arguments[1:])
    if "--plot" in arguments[1:]:
        print(text, end="")
