#!/usr/bin/env python3
"""Turns Google Benchmark JSON from bench_moe_routers into a PNG bar chart.

    build/default/bench/bench_moe_routers --benchmark_format=json > routers.json
    python3 scripts/bench_chart.py routers.json docs/moe_routers.png

Benchmarks are named route/<router>/T:<tokens>/E:<experts>/k:<k>. The chart has
one panel per T, in it one group of bars per (E, k) and one bar per router; the height
is the routing rate in million tokens/s (items_per_second), on a log scale because the
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
    token_counts = sorted({t for t, _, _ in shapes})
    # One panel per token count; in each, a group of bars per (E, k), a bar per router.
    fig, axes = plt.subplots(len(token_counts), 1, figsize=(11, 3.2 * len(token_counts)),
                             squeeze=False)
    width = 0.85 / len(routers)
    colors = plt.get_cmap("tab20").colors
    for row, tokens in enumerate(token_counts):
        ax = axes[row][0]
        panel = [s for s in shapes if s[0] == tokens]
        for i, r in enumerate(routers):
            xs = [j for j, shape in enumerate(panel) if r in rates[shape]]
            ys = [rates[panel[j]][r] / 1e6 for j in xs]
            ax.bar([x - 0.425 + (i + 0.5) * width for x in xs], ys, width,
                   color=colors[i % len(colors)], label=r if row == 0 else None)
        ax.set_xticks(range(len(panel)))
        ax.set_xticklabels([f"E {e}, k {k}" for _, e, k in panel], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("M tokens/s (log)")
        ax.set_title(f"T = {tokens} tokens", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle("switchyard MoE routers: logits to a finished DispatchPlan, 1 thread")
    fig.legend(loc="lower center", ncol=min(6, len(routers)), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(argv[2], dpi=110)
    print(f"bench_chart: wrote {argv[2]} ({len(shapes)} shapes x {len(routers)} routers)")


if __name__ == "__main__":
    main(sys.argv)
