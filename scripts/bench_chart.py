#!/usr/bin/env python3
"""Turns Google Benchmark JSON from bench_moe_routers into a PNG bar chart.

    build/default/bench/bench_moe_routers --benchmark_format=json > routers.json
    python3 scripts/bench_chart.py routers.json docs/moe_routers.png

Benchmarks are named route/<router>/T:<tokens>/E:<experts>/k:<k>. The chart has
one group of bars per shape (T, E, k) and one bar per router, with the height the
routing rate in million tokens/s (items_per_second), on a log scale because the
routers span orders of magnitude. Aggregates (mean/median) are used when present.
Needs Debian's python3-matplotlib (scripts/install_deps.sh --dev installs it).
"""
import json
import re
import sys
from collections import OrderedDict

NAME = re.compile(r"^route/(?P<router>[^/]+)/T:(?P<T>\d+)/E:(?P<E>\d+)/k:(?P<k>\d+)")


def load_rates(path):
    """{(T, E, k): {router: tokens/s}}, keeping the median aggregate if there is one."""
    with open(path) as f:
        data = json.load(f)
    rates = OrderedDict()
    preferred = {}
    for b in data.get("benchmarks", []):
        m = NAME.match(b.get("run_name", b["name"]))
        if not m or "items_per_second" not in b:
            continue
        kind = b.get("aggregate_name", "")
        if kind not in ("", "median", "mean"):
            continue
        shape = (int(m["T"]), int(m["E"]), int(m["k"]))
        router = m["router"]
        rank = {"median": 0, "mean": 1, "": 2}[kind]
        if rank <= preferred.get((shape, router), 3):
            preferred[(shape, router)] = rank
            rates.setdefault(shape, OrderedDict())[router] = b["items_per_second"]
    return rates


def main(argv):
    if len(argv) != 3:
        sys.exit(__doc__)
    rates = load_rates(argv[1])
    if not rates:
        sys.exit(f"bench_chart: no route/<router>/T:/E:/k: benchmarks with items_per_second in {argv[1]}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted(rates)
    routers = []
    for shape in shapes:
        for r in rates[shape]:
            if r not in routers:
                routers.append(r)
    width = 0.8 / len(routers)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(shapes) + 3), 5))
    for i, r in enumerate(routers):
        xs = [s for s, shape in enumerate(shapes) if r in rates[shape]]
        ys = [rates[shapes[s]][r] / 1e6 for s in xs]
        ax.bar([x - 0.4 + (i + 0.5) * width for x in xs], ys, width, label=r)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"T{t}\nE{e} k{k}" for t, e, k in shapes], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("routing rate, million tokens/s (log)")
    ax.set_title("switchyard MoE routers: logits to finished DispatchPlan, 1 thread")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(argv[2], dpi=110)
    print(f"bench_chart: wrote {argv[2]} ({len(shapes)} shapes x {len(routers)} routers)")


if __name__ == "__main__":
    main(sys.argv)
