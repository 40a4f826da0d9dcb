"""Prints the table of scripts/bench-vs-reference.sh from its runs' outputs.

    python3 scripts/bench_table.py WORK_DIR PAIRS
"""

import datetime
import re
import sys
from pathlib import Path


def grab(pattern, text, cast=float):
    m = re.search(pattern, text, re.M)
    return cast(m.group(1)) if m else None


def costs(text):
    m = re.search(r"^costs (\S+) (\S+)", text, re.M)
    if not m:
        return None, None
    return tuple(None if v == "?" else float(v) for v in m.groups())


def reference(text):
    """The reference's figures: sagas/s, p50, p99, CPU ms per saga by part."""
    rate = grab(r"completed in window: \d+ -> (\d+) sagas/s", text)
    cores = dict(re.findall(r"(\S+?)=([\d.]+)", text.split("cpu cores used", 1)[-1].split("|")[0]))
    counted = {k: float(v) for k, v in cores.items() if k != "other"}
    cpu = None
    if rate:
        cpu = {k: v * 1000 / rate for k, v in counted.items()}
    statements, rows = costs(text)
    return {
        "rate": rate,
        "p50": grab(r"p50=([\d.]+)ms", text),
        "p99": grab(r"p99=([\d.]+)ms", text),
        "cpu": cpu,
        "statements": statements,
        "rows": rows,
    }


def ours(text):
    cpu_line = re.search(r"^cpu ms per saga: (.*); all ([\d.]+)", text, re.M)
    cpu = None
    if cpu_line:
        cpu = {k: float(v) for k, v in re.findall(r"([\w-]+) ([\d.]+)", cpu_line.group(1))}
    statements, rows = costs(text)
    memory = re.search(r"^memory \(RSS MB\): (.*)", text, re.M)
    return {
        "rate": grab(r"^throughput: (\d+) sagas/s", text),
        "p50": grab(r"^latency ms: p50 ([\d.]+)", text),
        "p99": grab(r"p99 ([\d.]+)", text),
        "cpu": cpu,
        "statements": statements,
        "rows": rows,
        "memory": memory.group(1) if memory else "?",
    }


def fmt(v, digits=1):
    return "?" if v is None else f"{v:,.{digits}f}"


def ratio(a, b):
    return "?" if a is None or not b else f"**{a / b:.2f}x**"


def total(cpu):
    return None if cpu is None else sum(cpu.values())


def breakdown(cpu):
    if not cpu:
        return "?"
    return ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())


def main(work, pairs):
    work = Path(work)
    print(f"\nMeasured {datetime.date.today()} on this machine ({pairs} pair(s), each ours right after the reference's):\n")
    print("| measure | ours | reference | ratio |")
    print("|---|---|---|---|")
    for pair in range(1, pairs + 1):
        read = lambda name: (work / f"{name}-{pair}").read_text()
        us, ref = ours(read("ours-saturation")), reference(read("ref-saturation"))
        one_us, one_ref = ours(read("ours-one")), reference(read("ref-one"))
        open_us = ours(read("ours-open"))
        tag = f" (pair {pair})" if pairs > 1 else ""
        rows = [
            (f"saturation, 256 in flight: sagas/s{tag}", us["rate"], ref["rate"], 0),
            ("CPU ms per saga at saturation", total(us["cpu"]), total(ref["cpu"]), 2),
            ("Postgres statements per saga", us["statements"], ref["statements"], 1),
            ("Postgres rows written per saga", us["rows"], ref["rows"], 1),
            ("one saga in flight: p50 ms", one_us["p50"], one_ref["p50"], 1),
            ("one saga in flight: p99 ms", one_us["p99"], one_ref["p99"], 1),
        ]
        for name, a, b, digits in rows:
            print(f"| {name} | {fmt(a, digits)} | {fmt(b, digits)} | {ratio(a, b)} |")
        print(f"| CPU by part at saturation | {breakdown(us['cpu'])} | {breakdown(ref['cpu'])} | |")
        offered = grab(r"^placing \d+ orders \(([\d.]+) per second", read("ours-open"))
        print(
            f"| open loop at {fmt(offered, 0)}/s (half the reference's saturation): p50 / p99 ms "
            f"| {fmt(open_us['p50'])} / {fmt(open_us['p99'])} | (it has no open loop) | |"
        )
        print(f"| RSS MB at saturation | {us['memory']} | | |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
