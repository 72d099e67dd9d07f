#!/usr/bin/env python3
"""Figures of the benchmarks: PNGs drawn from the result documents the benchmarks write.

* ``bench/suite.py`` (through :func:`after_suite`): the latency CDF of every scenario, and the
  throughput over scenario 6's scale run, from the first pair to the last;
* ``bench/fill_curve.py``: throughput and p99 against how full the pool is;
* ``bench/cni_bench.py``: CNI ADD time, dsipam against host-local.

Each writes its figures next to its JSON in ``bench/results/`` and, when it updates
docs/performance.md (``--update-docs``), into ``docs/img/performance/`` too, which the doc
shows. On its own this module draws the figures of saved results again (into the docs by
default), for a run that was not made with ``--update-docs``::

    .venv/bin/python bench/plots.py bench/results/20261204-120000-scale.json [more.json ...] [--out DIR]
                                    [--figures latency-cdf,scale-throughput]

Needs matplotlib (``pip install -e '.[bench]'``; scripts/dev-env.sh installs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC_FIGURES = ROOT / "docs" / "img" / "performance"
SIZE = (9.0, 5.0)  # inches; at DPI 110 a 990 x 550 PNG
DPI = 110
# One colour per scenario, the same in every figure.
COLOURS = {"1": "tab:blue", "2": "tab:orange", "3": "tab:green", "4": "tab:red", "5": "tab:purple",
           "6": "tab:brown", "8": "tab:pink", "9": "tab:olive", "ceiling": "tab:gray"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("bench/plots.py needs matplotlib: .venv/bin/pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _caption(meta: dict[str, Any], extra: str = "") -> str:
    m = meta.get("machine", {})
    where = (f"{m.get('date', '?')}, {m.get('nproc', '?')} CPUs ({m.get('cpu', '?')}), "
             f"PostgreSQL {str(m.get('postgresql', '?')).split(' ')[0]}, Python {m.get('python', '?')}")
    text = f"measured {where}"
    if meta.get("command"):
        text += f"\n{meta['command']}"
    return text + (f"\n{extra}" if extra else "")


def _save(fig: Any, path: Path, caption: str) -> Path:
    fig.text(0.01, 0.01, caption, fontsize=7, color="0.35", va="bottom", ha="left", family="monospace", wrap=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp in the file: the same data gives the same PNG.
    fig.savefig(path, dpi=DPI, metadata={"Software": None, "Creation Time": None} if path.suffix == ".png" else None)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _bottom_margin(caption: str) -> float:
    return 0.12 + 0.028 * caption.count("\n")


# -- the suite ---------------------------------------------------------------------------------


def _median_run(runs: Sequence[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The run of scenario ``key`` whose throughput is the median of the runs (the lower middle one)."""
    have = [r["scenarios"][key] for r in runs if key in r.get("scenarios", {}) and "rps" in r["scenarios"][key]]
    if not have:
        return None
    ordered = sorted(have, key=lambda s: s["rps"])
    return ordered[(len(ordered) - 1) // 2]


SHORT_TITLES = {"1": "Allocate, dual-stack", "2": "Release", "3": "re-Allocate (idempotent)",
                "4": "Allocate, pool 99% full", "5": "mixed Allocate/Release", "6": "Allocate, scale run",
                "8": "Allocate, single-stack", "9": "Release, one family"}


def latency_cdf(doc: dict[str, Any], path: Path) -> Path | None:
    """Latency CDF of every scenario of a suite result (the median-throughput run of each), with the
    empty-RPC ceiling for reference. None when the result holds no CDF (made before they were kept)."""
    runs = doc["runs"]
    keys = sorted({k for r in runs for k in r.get("scenarios", {})}, key=int)
    series = []
    for key in keys:
        res = _median_run(runs, key)
        if res and res.get("latency_cdf"):
            series.append((key, f"{key}  {SHORT_TITLES.get(key, res['title'])}", res))
    ceilings = [r["ceilings"]["empty_rpc"] for r in runs if r.get("ceilings", {}).get("empty_rpc", {}).get("latency_cdf")]
    if ceilings:
        ceil = sorted(ceilings, key=lambda c: c["rps"])[(len(ceilings) - 1) // 2]
        series.append(("ceiling", "ceiling: empty RPC", ceil))
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11.0, 5.0))
    for key, label, res in series:
        pts = res["latency_cdf"]
        xs = [ms for _, ms in pts]
        ys = [pct for pct, _ in pts]
        ax.step(xs, ys, where="post", color=COLOURS.get(key, None), linewidth=1.6,
                linestyle="--" if key == "ceiling" else "-",
                label=f"{label}\n{res['rps']:,.0f}/s, p99 {res['p99_ms']:.1f} ms")
    ax.set_xscale("log")
    ax.set_xlabel("latency per call, client side (ms, log scale)")
    ax.set_ylabel("calls completed within that time (%)")
    ax.set_ylim(0, 100.5)
    ax.axhline(99, color="0.6", linewidth=0.8, linestyle=":")
    ax.text(ax.get_xlim()[1], 99, "p99 ", va="top", ha="right", fontsize=8, color="0.4")
    ax.grid(True, which="both", alpha=0.3)
    meta = doc["meta"]
    ax.set_title(f"Latency CDF per scenario (concurrency {meta.get('concurrency', '?')}; "
                 f"median-throughput run of {meta.get('runs', '?')})")
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), labelspacing=0.8)
    caption = _caption(meta)
    fig.subplots_adjust(left=0.07, right=0.78, top=0.92, bottom=_bottom_margin(caption) + 0.04)
    return _save(fig, path, caption)


def scale_throughput(doc: dict[str, Any], path: Path) -> Path | None:
    """Throughput second by second over scenario 6, against the pairs allocated so far."""
    res = _median_run(doc["runs"], "6")
    if not res or not res.get("timeline_per_s"):
        return None
    per_s = list(res["timeline_per_s"])
    if len(per_s) > 2:
        per_s = per_s[:-1]  # the last second is partial
    done, xs = 0, []
    for n in per_s:
        done += n
        xs.append(done / 1000)
    window = 10
    rolling = [statistics.fmean(per_s[max(0, i - window + 1): i + 1]) for i in range(len(per_s))]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    ax.plot(xs, per_s, color=COLOURS["6"], alpha=0.35, linewidth=0.8, label="pairs allocated in each second")
    ax.plot(xs, rolling, color=COLOURS["6"], linewidth=2, label=f"mean of the last {window} s")
    total = res["count"]
    ax.hlines(res["first10_rps"], 0, total * 0.1 / 1000, colors="tab:green", linewidth=2.5,
              label=f"first 10% of the pairs: {res['first10_rps']:,.0f}/s")
    ax.hlines(res["last10_rps"], total * 0.9 / 1000, total / 1000, colors="tab:red", linewidth=2.5,
              label=f"last 10%: {res['last10_rps']:,.0f}/s (x{res['last10_rps'] / max(res['first10_rps'], 1e-9):.2f})")
    ax.set_xlim(0, total / 1000)
    ax.set_ylim(0, max(per_s) * 1.15)
    ax.set_xlabel("pairs allocated so far (thousands)")
    ax.set_ylabel("throughput (pairs/s)")
    ax.set_title(f"Scenario 6: {res['title']}; {res['rps']:,.0f} pairs/s overall, "
                 f"p99 {res['p99_ms']:.1f} ms, {res['errors']} errors")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    caption = _caption(doc["meta"])
    fig.subplots_adjust(left=0.08, right=0.98, top=0.92, bottom=_bottom_margin(caption) + 0.04)
    return _save(fig, path, caption)


SUITE_FIGURES = {"latency-cdf": latency_cdf, "scale-throughput": scale_throughput}


def suite_figures(doc: dict[str, Any], out_dir: Path, prefix: str = "",
                  only: set[str] | None = None) -> list[Path]:
    """Every figure a suite result document has data for (or those of ``only``); the files written."""
    made = [draw(doc, out_dir / f"{prefix}{name}.png") for name, draw in SUITE_FIGURES.items()
            if only is None or name in only]
    return [p for p in made if p is not None]


def after_suite(doc: dict[str, Any], results_stem: Path, *, update_docs: bool) -> list[Path]:
    """bench/suite.py's hook: the figures next to the result files (``<stem>-latency-cdf.png`` ...)
    and, with ``--update-docs``, into docs/img/performance/ as well."""
    written = suite_figures(doc, results_stem.parent, prefix=results_stem.name + "-")
    if update_docs:
        written += suite_figures(doc, DOC_FIGURES)
    for p in written:
        print(f"[bench] figure {p}", file=sys.stderr, flush=True)
    return written


# -- the fill curve ----------------------------------------------------------------------------


def fill_curve(doc: dict[str, Any], path: Path) -> Path:
    """Throughput and p99 of Allocate against the fill of the pool before the run (bench/fill_curve.py)."""
    levels = doc["levels"]
    xs = [lv["fill"] * 100 for lv in levels]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    ax2 = ax.twinx()
    a = ax.plot(xs, [lv["rps"] for lv in levels], marker="o", color="tab:blue", linewidth=2,
                label="throughput (pairs/s, left axis)")
    b = ax2.plot(xs, [lv["p99_ms"] for lv in levels], marker="s", color="tab:red", linewidth=2,
                 label="p99 latency (ms, right axis)")
    c = ax2.plot(xs, [lv["p50_ms"] for lv in levels], marker=".", color="tab:red", linewidth=1, linestyle="--",
                 label="p50 latency (ms, right axis)")
    for lv, x in zip(levels, xs, strict=True):
        ax.annotate(f"{lv['count']:,}", (x, lv["rps"]), textcoords="offset points", xytext=(0, 7), fontsize=7,
                    ha="center", color="tab:blue")
    ax.set_xlabel("pool fill before the run (% of the pairs allocated, free addresses scattered)")
    ax.set_ylabel("throughput (pairs/s)", color="tab:blue")
    ax2.set_ylabel("latency per call (ms)", color="tab:red")
    ax.set_ylim(0, max(lv["rps"] for lv in levels) * 1.2)
    ax2.set_ylim(0, max(lv["p99_ms"] for lv in levels) * 1.3)
    ax.set_xlim(-2, 102)
    ax.grid(True, alpha=0.3)
    meta = doc["meta"]
    ax.set_title(f"Allocate (REQUIRE_DUAL_STACK) into a {meta['ranges'][0]} + {meta['ranges'][1]} pool "
                 f"filled by SQL; concurrency {meta['concurrency']}")
    lines = a + b + c
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="lower left")
    caption = _caption(meta, "numbers above the points: Allocates measured at that fill")
    fig.subplots_adjust(left=0.08, right=0.92, top=0.92, bottom=_bottom_margin(caption) + 0.04)
    return _save(fig, path, caption)


# -- cost per call (bench/rpc_cost.py) ----------------------------------------------------------

RPC_SHORT = {"health": "Health/Check (empty call)", "allocate_pair": "Allocate pair, new owners",
             "allocate_single": "Allocate single-stack, new owners", "reallocate": "Allocate again (idempotent)",
             "get_allocation": "GetAllocation", "get_pool": "GetPool", "list_allocations": "ListAllocations (100)",
             "list_blocks": "ListBlocks (100)", "release_family": "Release, one family", "release": "Release",
             "gc": "GarbageCollect (10,000 owners)"}


def rpc_cost(doc: dict[str, Any], path: Path) -> Path | None:
    """Server and PostgreSQL CPU per call of every RPC (medians), with the ratio to the empty call."""
    summary = doc["summary"]
    keys = [k for k in RPC_SHORT if k in summary and "server_cpu_us" in summary[k] and k != "gc"]
    if not keys:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    ys = list(range(len(keys)))[::-1]
    server = [summary[k]["server_cpu_us"] for k in keys]
    pg = [summary[k]["pg_cpu_us"] for k in keys]
    ax.barh(ys, server, color="tab:blue", label="dsipam server CPU per call (µs)")
    ax.barh(ys, pg, left=server, color="tab:orange", label="PostgreSQL CPU per call (µs)")
    for y, k, s_, p_ in zip(ys, keys, server, pg, strict=True):
        ratio = summary[k].get("ratio")
        ax.annotate(f"{ratio:.2f}× empty" if ratio else "", (s_ + p_, y), textcoords="offset points",
                    xytext=(4, -3), fontsize=8)
    ax.set_yticks(ys, [RPC_SHORT[k] for k in keys], fontsize=8)
    ax.set_xlabel("CPU time per call (µs; median of the runs); the label: server CPU ÷ the empty call's")
    ax.set_xlim(0, max(s_ + p_ for s_, p_ in zip(server, pg, strict=True)) * 1.2)
    ax.grid(True, axis="x", alpha=0.3)
    meta = doc["meta"]
    ax.set_title(f"Cost per call, {meta['generator']}, {meta['concurrency']} in flight; server on CPU "
                 f"{meta['server_cpu']}, load generator on CPU {meta['load_cpu']}")
    ax.legend(fontsize=8, loc="lower right")
    caption = _caption({"machine": {**meta, "date": meta.get("date", "?")}, "command": meta.get("command", "")},
                       f"median of {meta['runs']} run(s), {meta['n']:,} calls per RPC")
    fig.subplots_adjust(left=0.27, right=0.97, top=0.92, bottom=_bottom_margin(caption) + 0.05)
    return _save(fig, path, caption)


# -- the CNI plugin ----------------------------------------------------------------------------

CNI_SERIES = (
    ("bridge+dsipam ADD", "bridge + dsipam ADD", "tab:blue", "-"),
    ("bridge+host-local ADD", "bridge + host-local ADD", "tab:orange", "-"),
    ("dsipam ADD alone", "dsipam plugin alone, ADD", "tab:blue", ":"),
    ("host-local ADD alone", "host-local plugin alone, ADD", "tab:orange", ":"),
)


def cni_add(doc: dict[str, Any], path: Path) -> Path | None:
    """CDF of the CNI ADD wall time, dsipam against host-local, from bench/cni_bench.py's samples."""
    samples = doc["samples"]
    present = [s for s in CNI_SERIES if samples.get(s[0], {}).get("wall_ms")]
    if not present:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    for key, label, colour, style in present:
        wall = sorted(samples[key]["wall_ms"])
        ys = [100 * (i + 1) / len(wall) for i in range(len(wall))]
        ax.step(wall, ys, where="post", color=colour, linestyle=style, linewidth=1.8,
                label=f"{label}: median {samples[key]['median_ms']:.1f} ms, CPU {samples[key]['cpu_median_ms']:.1f} ms"
                      f" (n={len(wall)})")
    ax.set_xscale("log")
    ax.set_xlabel("wall time of one plugin process (ms, log scale)")
    ax.set_ylabel("calls completed within that time (%)")
    ax.set_ylim(0, 100.5)
    ax.grid(True, which="both", alpha=0.3)
    ratios = doc.get("ratios", {})
    pooled = ratios.get("ADD: bridge+dsipam / bridge+host-local (median)")
    per_run = ratios.get("ADD: median over the runs of each run's bridge+dsipam / bridge+host-local median")
    title = "CNI ADD, dual-stack, through Debian's bridge plugin"
    if pooled:
        title += f"\ndsipam / host-local median: {pooled:.2f}x"
        if per_run and doc.get("repeat", 1) > 1:
            title += f" (median of the {doc['repeat']} runs' ratios: {per_run:.2f}x)"
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8, loc="lower right")
    meta = {"machine": doc.get("machine", {}), "command": doc.get("command", "")}
    load = doc.get("loadavg_at_end")
    caption = _caption(meta, f"plugin interpreter {doc.get('machine', {}).get('plugin_python', '?')}; "
                             f"{doc.get('repeat', 1)} x {doc.get('cycles', '?')} interleaved cycles, "
                             f"{doc.get('pause', '?')} s pause; load average at start "
                             f"{str(doc.get('machine', {}).get('loadavg_at_start', '?')).split(' ')[0][:4]}"
                             + (f", at the end {load[0]}" if load else ""))
    fig.subplots_adjust(left=0.08, right=0.98, top=0.88, bottom=_bottom_margin(caption) + 0.04)
    return _save(fig, path, caption)


# -- again, from saved results ------------------------------------------------------------------


def render(result: Path, out_dir: Path, only: set[str] | None = None) -> list[Path]:
    """The figures of one saved result document, whichever benchmark wrote it (of a suite result,
    only those named in ``only`` when given)."""
    doc = json.loads(result.read_text())
    if doc.get("kind") == "fill-curve":
        return [fill_curve(doc, out_dir / "fill-curve.png")]
    if doc.get("kind") == "rpc-cost":
        made = rpc_cost(doc, out_dir / "rpc-cost.png")
        return [made] if made is not None else []
    if "samples" in doc and "ratios" in doc:
        made = cni_add(doc, out_dir / "cni-add.png")
        if made is None:
            raise SystemExit(f"{result}: no per-sample times (made before cni_bench.py kept them)")
        return [made]
    if "runs" in doc and "meta" in doc:
        return suite_figures(doc, out_dir, only=only)
    raise SystemExit(f"{result}: not a result of bench/suite.py, bench/fill_curve.py or bench/cni_bench.py")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="result JSON files (bench/results/*.json)")
    p.add_argument("--out", type=Path, default=DOC_FIGURES, help=f"where the PNGs go (default {DOC_FIGURES})")
    p.add_argument("--figures", help=f"of a suite result, only these (comma-separated: {', '.join(SUITE_FIGURES)})")
    a = p.parse_args(argv)
    only = {x.strip() for x in a.figures.split(",") if x.strip()} if a.figures else None
    if only and only - set(SUITE_FIGURES):
        p.error(f"--figures: {', '.join(sorted(only - set(SUITE_FIGURES)))} is not one of {', '.join(SUITE_FIGURES)}")
    for result in a.results:
        made_any = render(result, a.out, only)
        if not made_any:
            raise SystemExit(f"{result}: no figure drawn (no data for {a.figures or 'any figure'})")
        for made in made_any:
            print(made)
    return 0


if __name__ == "__main__":
    sys.exit(main())
