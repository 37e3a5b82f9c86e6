#!/usr/bin/env python3
"""Renders the README's performance charts from Google Benchmark JSON.

    scripts/make_charts.sh                  # runs the benchmarks, then this script
    python3 scripts/bench_chart.py --json-dir build/charts --out-dir docs [--only NAME ...]
    python3 scripts/bench_chart.py routers.json out.png     # router chart from one JSON file

Charts (NAME: output file <- inputs in --json-dir):
  routers    moe_routers.png         <- bench_moe_routers.json
             each router's speed-up over the naive argsort router ("naive_sort", same run)
             at T 4096, E 64 and 256, k 8 (routers that exist only at another k are shown
             at that k, hatched, with a note).
  peak       fraction_of_peak.png    <- bench_gemm.json, bench_attention.json (+ bench_peak.json)
             sgemm (ours, Eigen, OpenBLAS) and fused attention as % of the FMA peak (their
             %peak counters: the peak bench_peak's probe measured in the same process).
  crossover  attention_crossover.png <- bench_linear_attention*.json, bench_routing_attention*.json
             speed-up of linear and routing attention over fused dense attention against T,
             with the interpolated crossover T.
  moe        moe_layer_vs_dense.png  <- bench_moe_layer.json
             MoE layer GFLOP/s beside dense GEMMs doing the same active work (+ Soft MoE).

Every ratio divides two numbers measured in the same benchmark process (the machine may be
shared and noisy: ratios are meaningful, absolute rates across runs are not). Repetitions:
the median aggregate when present, else the median of the runs. The CPU and thread count
come from build/charts/lscpu.txt and run_info.txt (written by make_charts.sh), else from
this machine's lscpu when the JSON was recorded on this host.
Needs matplotlib (Debian: python3-matplotlib; scripts/install_deps.sh --dev installs it).
"""
import argparse
import glob
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys

# ----------------------------------------------------------------------------- loading

UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


class Runs:
    """Benchmarks of one or more Google Benchmark JSON files, by run_name.

    value(name, field) is the median aggregate when the file has one, else the median of the
    repetitions; time fields are converted to seconds."""

    def __init__(self, paths):
        self.paths = list(paths)
        self.context = {}
        self.iterations = {}  # run_name -> [entry]
        self.aggregates = {}  # (run_name, aggregate_name) -> entry
        self.order = []
        rank = {}  # run_name -> registration order (random interleaving shuffles the file)
        for file_index, path in enumerate(self.paths):
            with open(path) as f:
                data = json.load(f)
            if not self.context:
                self.context = data.get("context", {})
            for b in data.get("benchmarks", []):
                name = b.get("run_name", b["name"])
                if b.get("error_occurred"):
                    continue
                if name not in rank:
                    rank[name] = (file_index, b.get("family_index", 0),
                                  b.get("per_family_instance_index", 0), len(rank))
                    self.order.append(name)
                if b.get("run_type") == "aggregate":
                    self.aggregates[(name, b.get("aggregate_name", ""))] = b
                else:
                    self.iterations.setdefault(name, []).append(b)
        self.order.sort(key=lambda n: rank[n])

    def __bool__(self):
        return bool(self.order)

    def names(self):
        return list(self.order)

    @staticmethod
    def _field(entry, field):
        if field in ("cpu_time", "real_time"):
            return entry[field] * UNIT_SECONDS[entry.get("time_unit", "ns")]
        v = entry.get(field)
        return float(v) if isinstance(v, (int, float)) else None

    def value(self, name, field):
        agg = self.aggregates.get((name, "median"))
        if agg is not None and self._field(agg, field) is not None:
            return self._field(agg, field)
        vals = [self._field(e, field) for e in self.iterations.get(name, [])]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    def spread(self, name, field):
        """(min, max) over the repetitions, or None with fewer than two."""
        vals = [self._field(e, field) for e in self.iterations.get(name, [])]
        vals = [v for v in vals if v is not None]
        return (min(vals), max(vals)) if len(vals) > 1 else None

    def label(self, name):
        for e in self.iterations.get(name, []):
            if e.get("label"):
                return e["label"]
        return ""

    def repetitions(self):
        reps = [len(v) for v in self.iterations.values()]
        return max(reps) if reps else 0


def load(json_dir, stem):
    """Runs from <json_dir>/<stem>.json and <stem>_*.json (a split run), or None."""
    paths = sorted(glob.glob(os.path.join(json_dir, stem + ".json")))
    paths += sorted(glob.glob(os.path.join(json_dir, stem + "_*.json")))
    runs = Runs(paths) if paths else None
    return runs if runs else None


# ----------------------------------------------------------------------------- the machine

INTEL_FAMILY6 = {  # model -> code name, for hypervisors that report a generic model name
    85: "Skylake-SP / Cascade Lake", 106: "Ice Lake-SP", 108: "Ice Lake-D",
    143: "Sapphire Rapids", 207: "Emerald Rapids", 173: "Granite Rapids", 175: "Sierra Forest",
    151: "Alder Lake", 183: "Raptor Lake", 186: "Raptor Lake",
}
AMD_FAMILIES = {23: "Zen / Zen 2", 26: "Zen 5"}


def parse_lscpu(text):
    out = {}
    for line in text.splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            out.setdefault(key.strip(), value.strip())
    return out


def cpu_description(lscpu):
    """e.g. 'Intel Xeon (Emerald Rapids), AVX-512, 2 vCPUs (KVM)'."""
    name = lscpu.get("Model name", "")
    if not name:
        return ""
    name = re.sub(r"\((R|TM|tm)\)", "", name)
    name = re.sub(r"\s+CPU\s+@.*$", "", name)
    name = re.sub(r"\s+(\d+-Core )?Processor$", "", name)
    name = re.sub(r"\s+", " ", name).strip()
    vendor = lscpu.get("Vendor ID", "")
    try:
        family, model = int(lscpu.get("CPU family", "")), int(lscpu.get("Model", ""))
    except ValueError:
        family = model = None
    code = None
    if vendor == "GenuineIntel" and family == 6:
        code = INTEL_FAMILY6.get(model)
    elif vendor == "AuthenticAMD" and family == 25:  # 0x19: Zen 3 or Zen 4 by model
        zen4 = any(lo <= model <= hi for lo, hi in ((0x10, 0x1F), (0x60, 0x7F), (0xA0, 0xAF)))
        code = "Zen 4" if zen4 else "Zen 3"
    elif vendor == "AuthenticAMD":
        code = AMD_FAMILIES.get(family)
    if code and code.split()[0] not in name:
        name += f" ({code})"
    flags = set(lscpu.get("Flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    parts = [name] + ([isa] if isa else [])
    cpus = lscpu.get("CPU(s)", "")
    if cpus:
        hv = lscpu.get("Hypervisor vendor", "")
        parts.append(f"{cpus} {'vCPUs' if hv else 'CPUs'}" + (f" ({hv})" if hv else ""))
    return ", ".join(parts)


class Machine:
    """What the footnotes say about where and how the numbers were measured."""

    def __init__(self, json_dir, context):
        self.info = {}
        self.cpu = ""
        path = os.path.join(json_dir, "run_info.txt") if json_dir else None
        if path and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(":")
                    self.info[key.strip()] = value.strip()
        lscpu_path = os.path.join(json_dir, "lscpu.txt") if json_dir else None
        if lscpu_path and os.path.exists(lscpu_path):
            with open(lscpu_path) as f:
                self.cpu = cpu_description(parse_lscpu(f.read()))
        elif context.get("host_name") == socket.gethostname():
            try:
                text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
                self.cpu = cpu_description(parse_lscpu(text))
            except (OSError, subprocess.CalledProcessError):
                pass
        if not self.cpu:
            n, mhz = context.get("num_cpus"), context.get("mhz_per_cpu")
            host = context.get("host_name", "unknown host")
            self.cpu = f"host {host}" + (f", {n} CPUs at {mhz} MHz" if n else "")
        self.context = context

    def footnote(self, runs, extra=""):
        reps = runs.repetitions() if runs else 0
        bits = [self.cpu, "1 thread, float"]
        if reps > 1:
            bits.append(f"median of {reps} runs")
        date = self.info.get("date") or self.context.get("date", "")
        if date:
            bits.append(date[:10])
        if self.info.get("commit"):
            bits.append(f"switchyard {self.info['commit']}")
        line = " · ".join(bits)
        load = self.info.get("load_start")
        if load is None and self.context.get("load_avg"):
            load = " ".join(f"{x:.1f}" for x in self.context["load_avg"])
        note = "Shared machine: compare bars within this chart (measured side by side), " \
               "not absolute rates across runs"
        if load:
            note += f"; load average at start {load.split()[0]}"
        if self.info.get("quick") == "1":
            note = "QUICK SMOKE RUN (tiny min_time, 1 repetition): numbers are rough. " + note
        return line + "\n" + note + (("\n" + extra) if extra else "")


# ----------------------------------------------------------------------------- plotting helpers

def pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("bench_chart: needs matplotlib (Debian: apt install python3-matplotlib, or "
                 "scripts/install_deps.sh --dev); Debian's is /usr/bin/python3's")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({
        "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9,
        "ytick.labelsize": 9, "legend.fontsize": 9, "figure.titlesize": 13,
        "axes.spines.top": False, "axes.spines.right": False, "savefig.facecolor": "white",
    })
    return plt


WIDTH_IN = 9.0  # 1350 px at 150 dpi; README width (~900 px) scales it by 2/3
DPI = 150
BLUE, ORANGE, GREY, GREEN, RED, PURPLE = ("#3366aa", "#ee8833", "#999999", "#44aa77", "#cc4444",
                                          "#8866bb")


FOOT_LINE_IN = 0.135  # one 7.5 pt footnote line, in inches


def wrap(text, width=160):
    import textwrap
    return "\n".join(textwrap.fill(p, width, break_on_hyphens=False) if p else ""
                     for p in text.split("\n"))


def figure(plt, height_in, foot, notes="", below_axes_in=0.75, above_axes_in=0.85,
           left=0.1, right=0.98):
    """A WIDTH_IN-wide figure with the footnote (and notes above it) at the bottom; returns
    the figure and the axes rectangle [left, bottom, width, height] between them."""
    foot = wrap(foot)
    notes = wrap(notes, 156) if notes else ""
    foot_in = 0.08 + FOOT_LINE_IN * (foot.count("\n") + 1)
    notes_in = (0.1 + 0.148 * (notes.count("\n") + 1)) if notes else 0.0
    fig = plt.figure(figsize=(WIDTH_IN, height_in + foot_in + notes_in))
    h = height_in + foot_in + notes_in
    fig.text(0.01, 0.06 / h, foot, ha="left", va="bottom", fontsize=7.5, color="#555555",
             linespacing=1.35)
    if notes:
        fig.text(0.01, (foot_in + 0.08) / h, notes, ha="left", va="bottom", fontsize=7.8,
                 color="#333333", linespacing=1.35)
    bottom = (foot_in + notes_in + below_axes_in) / h
    top = 1 - above_axes_in / h
    return fig, h, [left, bottom, right - left, top - bottom]


def titles(fig, h, title, subtitle):
    fig.text(0.01, 1 - 0.1 / h, title, ha="left", va="top", fontsize=13, fontweight="bold")
    fig.text(0.01, 1 - 0.4 / h, subtitle, ha="left", va="top", fontsize=9.5, color="#333333")


def save(fig, out):
    """Writes the PNG; with Pillow (a matplotlib dependency) as a 256-colour palette image,
    a third of the size and the same look for flat charts like these."""
    import io
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    plt.close(fig)
    try:
        from PIL import Image
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        img = img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        img.save(out, optimize=True)
    except (ImportError, AttributeError):
        with open(out, "wb") as f:
            f.write(buf.getvalue())


def fmt_x(v):
    return f"{v:.0f}×" if v >= 99.5 else f"{v:.1f}×" if v >= 9.95 else f"{v:.2f}×"


# ----------------------------------------------------------------------------- 1. routers

ROUTE = re.compile(r"^route/(?P<router>[^/]+)/T:(?P<T>\d+)/E:(?P<E>\d+)/k:(?P<k>\d+)$")
HEADLINE_T, HEADLINE_E, HEADLINE_K = 4096, (64, 256), 8
YARDSTICK = "naive_sort"
ONLY_K_WHY = {  # why a router has no bar at the headline k (else a generic sentence)
    "gshard_top2": "GShard routing is top-2 by definition",
    "switch_capacity": "Switch is the capacity router at k 1 (megatron_capacity is the same "
                       "router at k > 1)",
}


def chart_routers(runs, out, machine):
    seconds = {}  # (T, E, k) -> {router: s}
    for name in runs.names():
        m = ROUTE.match(name)
        if m:
            t = runs.value(name, "cpu_time")
            if t:
                key = (int(m["T"]), int(m["E"]), int(m["k"]))
                seconds.setdefault(key, {})[m["router"]] = t
    if not seconds:
        raise ChartError("no route/<router>/T:/E:/k: benchmarks")
    token_counts = sorted({t for t, _, _ in seconds})
    T = HEADLINE_T if HEADLINE_T in token_counts else token_counts[-1]
    present_e = sorted({e for t, e, _ in seconds if t == T})
    experts = [e for e in HEADLINE_E if e in present_e] or present_e[-2:]
    head_k, ks_at = {}, {}
    for e in experts:
        ks_at[e] = sorted(k for t, ee, k in seconds if t == T and ee == e
                          and YARDSTICK in seconds[(t, ee, k)])
        if not ks_at[e]:
            raise ChartError(f"no {YARDSTICK} benchmark at T {T}, E {e}")
        head_k[e] = HEADLINE_K if HEADLINE_K in ks_at[e] else ks_at[e][-1]
    routers = []
    for t, e, k in sorted(seconds):
        if t == T and e in experts:
            routers += [r for r in seconds[(t, e, k)] if r != YARDSTICK and r not in routers]

    # cell[(router, E)] = (speed-up, k used, fell back to another k)
    cell = {}
    for r in routers:
        for e in experts:
            k0 = head_k[e]
            if r in seconds[(T, e, k0)]:
                cell[(r, e)] = (seconds[(T, e, k0)][YARDSTICK] / seconds[(T, e, k0)][r], k0, False)
                continue
            alts = [k for k in ks_at[e] if r in seconds[(T, e, k)]]
            if alts:
                k = min(alts, key=lambda kk: (abs(math.log(kk / k0)), -kk))
                cell[(r, e)] = (seconds[(T, e, k)][YARDSTICK] / seconds[(T, e, k)][r], k, True)

    def best(r):
        return max((cell[(r, e)][0] for e in experts if (r, e) in cell), default=0.0)

    # Order by the first E's speed-up (fastest on top); routers measured only at another k
    # go to the bottom, so the headline-k rows read as one ranking.
    def order_key(r):
        fallback = all(cell.get((r, e), (0, 0, True))[2] for e in experts)
        first = cell.get((r, experts[0]))
        return (fallback, first is None, -(first[0] if first else best(r)))

    routers.sort(key=order_key)
    # The scale comes from the routers at the headline k, leaving out any that would stretch
    # it (hash: no scores to rank, just arithmetic on token ids); longer bars are cut.
    head = sorted(((max(c[0] for c in cs), r) for r in routers
                   if (cs := [cell[(r, e)] for e in experts if (r, e) in cell and not cell[(r, e)][2]])),
                  reverse=True)
    outliers = set()
    while len(head) > 1 and head[0][0] > 1.8 * head[1][0]:
        outliers.add(head.pop(0)[1])
    scale = head[0][0] if head else max((c[0] for c in cell.values()), default=1.0)
    xmax = max(scale * 1.3, 2.0)
    clipped = sorted({r for (r, e), c in cell.items() if c[0] > xmax * 0.97})

    plt = pyplot()
    from matplotlib.patches import Patch
    n = len(routers)
    notes = []
    naive_ms = ", ".join(f"{seconds[(T, e, head_k[e])][YARDSTICK] * 1e3:.1f} ms at E {e}"
                         for e in experts)
    notes.append(f"{YARDSTICK} (= 1×): softmax, a full argsort of each row, then a stable sort of "
                 f"all (expert, token) pairs: {naive_ms} (k {head_k[experts[0]]}).")
    if clipped:
        why = " (no scores to rank: it hashes token ids)" if clipped == ["hash"] else ""
        notes.append(f"Bars cut at the end of the axis (//, value printed): "
                     f"{', '.join(clipped)}{why}.")
    for r in routers:
        used = {cell[(r, e)][1] for e in experts if (r, e) in cell and cell[(r, e)][2]}
        if used:
            why = ONLY_K_WHY.get(r, f"{r} did not run at k {head_k[experts[0]]}")
            notes.append(f"{r} (hatched): {why}; compared at k {'/'.join(map(str, sorted(used)))} "
                         f"with {YARDSTICK} at that k.")
    missing = [f"{r} at E {e}" for r in routers for e in experts if (r, e) not in cell]
    if missing:
        notes.append("Not run: " + ", ".join(missing) + ".")
    fig, h, rect = figure(plt, 1.75 + 0.44 * n, machine.footnote(runs), "\n".join(notes),
                          below_axes_in=0.55, above_axes_in=1.05, left=0.2)
    ax = fig.add_axes(rect)
    colors = [BLUE, ORANGE, GREEN, PURPLE]
    bar_h = 0.8 / len(experts)
    for i, r in enumerate(routers):
        for j, e in enumerate(experts):
            y = i - 0.4 + (j + 0.5) * bar_h
            if (r, e) not in cell:
                ax.text(0.02 * xmax, y, f"not run at E {e}", va="center", fontsize=8,
                        color="#777777")
                continue
            v, k, fallback = cell[(r, e)]
            shown = min(v, xmax * 0.97)
            ax.barh(y, shown, bar_h * 0.92, color=colors[j % len(colors)],
                    hatch="///" if fallback else None, edgecolor="white" if fallback else None,
                    linewidth=0)
            label = fmt_x(v) + (f" (k {k})" if fallback else "")
            if v > shown:  # cut bar: a break mark and the value inside
                for dx in (0.0, 0.014 * xmax):
                    x0 = shown * 0.9 + dx
                    ax.plot([x0 - 0.006 * xmax, x0 + 0.006 * xmax],
                            [y + bar_h * 0.55, y - bar_h * 0.55],
                            color="white", linewidth=2.4, solid_capstyle="butt")
                ax.text(shown * 0.885, y, label, va="center", ha="right", fontsize=8.5,
                        color="white", fontweight="bold",
                        bbox=dict(facecolor=colors[j % len(colors)], edgecolor="none", pad=1.0))
            else:
                ax.text(shown + 0.008 * xmax, y, label, va="center", ha="left", fontsize=8.5)
    ax.set_yticks(range(n))
    labels = []
    for r in routers:
        ks = {cell[(r, e)][1] for e in experts if (r, e) in cell and cell[(r, e)][2]}
        labels.append(r + (f"\n(k {'/'.join(map(str, sorted(ks)))} only)" if ks else ""))
    ax.set_yticklabels(labels)
    ax.set_xlim(0, xmax)
    ax.set_ylim(n - 0.5, -0.75)
    ax.axvline(1.0, color="#444444", linewidth=1, linestyle="--")
    ax.text(1.0, -0.72, f" {YARDSTICK} = 1×", fontsize=8, color="#444444", va="top")
    ax.set_xlabel(f"speed-up over {YARDSTICK} ({YARDSTICK} time ÷ router time, same run; "
                  "higher is better)")
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=colors[j % len(colors)], label=f"E {e} experts")
               for j, e in enumerate(experts)]
    if any(c[2] for c in cell.values()):
        handles.append(Patch(facecolor="#aaaaaa", hatch="///", edgecolor="white",
                             label="router exists only at another k (see note)"))
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.005),
              ncol=len(handles), frameon=False, handlelength=1.8)
    titles(fig, h, "MoE routers: speed-up over a naive argsort router",
           f"Router logits [T {T}, E] to a finished DispatchPlan (CSR runs, [T, k] views, "
           f"statistics, losses), k {head_k[experts[0]]}, 1 thread")
    save(fig, out)
    summary = {r: {e: cell[(r, e)] for e in experts if (r, e) in cell} for r in routers}
    return summary, {"T": T, "k": head_k, "naive_ms": {
        e: seconds[(T, e, head_k[e])][YARDSTICK] * 1e3 for e in experts}}


# ----------------------------------------------------------------------------- 2. fraction of peak

GEMM = re.compile(r"^BM_(?P<impl>Ours|Eigen|OpenBLAS)/M:(?P<M>\d+)/N:(?P<N>\d+)/K:(?P<K>\d+)")
FUSED = re.compile(r"^fused/T:(?P<T>\d+)/causal:(?P<c>[01])/threads:1$")
SSE_ONLY_CORES = {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Katmai",
                  "Coppermine", "Northwood", "Banias", "Atom", "Opteron", "Barcelona"}


def peak_gflops(peak_runs):
    if not peak_runs:
        return None
    for name in peak_runs.names():
        if name.startswith("BM_Fp32FmaPeak"):
            v = peak_runs.value(name, "cached_peak_GFLOP/s") or peak_runs.value(name, "GFLOP/s")
            return v, peak_runs.label(name)
    return None


def process_peak(runs):
    """The FMA peak the benchmark process measured (GFLOP/s ÷ %peak of its own runs), or None."""
    vals = [e["GFLOP/s"] * 100 / e["%peak"] for es in runs.iterations.values() for e in es
            if isinstance(e.get("GFLOP/s"), (int, float)) and e.get("%peak")]
    return statistics.median(vals) if vals else None


def run_peak(data):
    """(bench_peak's GFLOP/s or None, {benchmark: the peak its own process measured}, ISA)."""
    peaks, isa, bench_peak = {}, "", None
    bp = peak_gflops(data.get("bench_peak"))
    if bp:
        bench_peak, isa = bp
    for stem in ("bench_gemm", "bench_attention", "bench_moe_layer"):
        p = process_peak(data[stem]) if data.get(stem) else None
        if p:
            peaks[stem] = p
    return bench_peak, peaks, isa


def pct_of_peak(runs, name, bench_peak):
    """(median % of the FMA peak, (min, max) or None). The benchmark's own %peak counter when
    it has one: its FLOP/s over the peak measured in the same process, seconds before, by the
    probe bench_peak runs (support/peak.hpp, best of 5). On a shared host the clock moves by
    10 % and more between processes, so that denominator matches the kernel's conditions
    better than one measured minutes apart. Else GFLOP/s over bench_peak's value."""
    pct = runs.value(name, "%peak")
    if pct:
        return pct, runs.spread(name, "%peak")
    if not bench_peak:
        raise ChartError(f"{name} has no %peak counter and bench_peak.json is missing")
    spread = runs.spread(name, "GFLOP/s")
    return (100 * runs.value(name, "GFLOP/s") / bench_peak,
            spread and tuple(100 * v / bench_peak for v in spread))


def chart_peak(gemm, attn, peak_info, out, machine, run_info):
    bench_peak, peaks, isa = peak_info
    impls = ["Ours", "Eigen", "OpenBLAS"]

    def pct(runs, name):
        return pct_of_peak(runs, name, bench_peak)

    gemm_pct, gemm_shapes, blas_core = {}, [], ""
    for name in (gemm.names() if gemm else []):
        m = GEMM.match(name)
        if not m:
            continue
        shape = (int(m["M"]), int(m["N"]), int(m["K"]))
        if shape not in gemm_shapes:
            gemm_shapes.append(shape)
        gemm_pct[(m["impl"], shape)] = pct(gemm, name)
        if m["impl"] == "OpenBLAS":
            blas_core = gemm.label(name).replace("core=", "")
    attn_pct, attn_T = {}, []
    for name in (attn.names() if attn else []):
        m = FUSED.match(name)
        if not m:
            continue
        T = int(m["T"])
        if T not in attn_T:
            attn_T.append(T)
        attn_pct[(T, m["c"] == "1")] = pct(attn, name)
    if not gemm_pct and not attn_pct:
        raise ChartError("no BM_Ours/BM_Eigen/BM_OpenBLAS or fused/T:/causal:/threads:1 benchmarks")
    attn_T.sort()
    isa_name = ("AVX-512" if isa.startswith("avx512") else "AVX2" if "avx2" in isa
                else isa.upper())
    measured = [f"{label} {peaks[stem]:.0f}" for stem, label in
                (("bench_gemm", "sgemm"), ("bench_attention", "attention")) if stem in peaks]
    if bench_peak:
        measured.append(f"bench_peak {bench_peak:.0f}")
    peak_text = ("; ".join(measured) + " GFLOP/s") if measured else ""
    plt = pyplot()
    foot_extra = ""
    forced = run_info.get("openblas_coretype", "")
    if forced:
        foot_extra = (f"OpenBLAS does not recognise this CPU and would run its pre-AVX "
                      f"'{run_info.get('openblas_detected', '?')}' kernels: make_charts.sh set "
                      f"OPENBLAS_CORETYPE={forced}.")
    elif blas_core in SSE_ONLY_CORES:
        foot_extra = (f"Warning: OpenBLAS ran its '{blas_core}' (pre-AVX) kernels: it did not "
                      "recognise this CPU; set OPENBLAS_CORETYPE (make_charts.sh does).")
    all_peaks = list(peaks.values()) + ([bench_peak] if bench_peak else [])
    if all_peaks and max(all_peaks) > 1.03 * min(all_peaks):
        foot_extra = (f"The measured peak moved with this host's clock ({min(all_peaks):.0f}-"
                      f"{max(all_peaks):.0f} GFLOP/s across the run's processes), hence a peak "
                      "per process. " + foot_extra)
    foot_extra = ("Causal attention counts the FLOPs of the visible half. " + foot_extra).strip()
    if (gemm or attn).repetitions() > 1:
        foot_extra = "Whiskers: min-max of the repetitions. " + foot_extra
    fig, h, (left, bottom, width, height) = figure(
        plt, 5.0, machine.footnote(gemm or attn, foot_extra), below_axes_in=0.72,
        above_axes_in=1.05, left=0.075, right=0.99)
    n_g, n_a = max(1, len(gemm_shapes)), max(1, len(attn_T))
    gap = 0.04
    w_g = (width - gap) * (n_g * 3.3) / (n_g * 3.3 + n_a * 2.4)
    ax_g = fig.add_axes([left, bottom, w_g, height])
    ax_a = fig.add_axes([left + w_g + gap, bottom, width - gap - w_g, height], sharey=ax_g)
    all_vals = [v[0] for v in gemm_pct.values()] + [v[0] for v in attn_pct.values()]
    ymax = max(100.0, max(all_vals)) * 1.22

    def bars(ax, groups, series, values, colors, width):
        for i, s in enumerate(series):
            for j, g in enumerate(groups):
                if (s, g) not in values:
                    continue
                v, spread = values[(s, g)]
                x = j - width * len(series) / 2 + (i + 0.5) * width
                ax.bar(x, v, width * 0.92, color=colors[i], label=None)
                if spread:
                    ax.plot([x, x], spread, color="#222222", linewidth=0.8)
                ax.text(x, max(v, spread[1] if spread else v) + 1.0, f"{v:.0f}", ha="center",
                        va="bottom", fontsize=7.8)

    blas_name = "OpenBLAS" + (f" ({blas_core})" if blas_core else "")
    g_labels = {"Ours": "switchyard", "Eigen": "Eigen 3.4", "OpenBLAS": blas_name}
    g_colors = [BLUE, GREY, ORANGE]
    bars(ax_g, gemm_shapes, impls, gemm_pct, g_colors, 0.27)
    ax_g.set_xticks(range(len(gemm_shapes)))
    tick = []
    for (M, N, K) in gemm_shapes:
        if M == N == K:
            tick.append(f"{M}³")
        else:
            what = {(512, 2816, 1024): "\nMoE up-proj.", (512, 1024, 2816): "\nMoE down-proj."}
            tick.append(f"{M}×{N}×{K}{what.get((M, N, K), '')}")
    ax_g.set_xticklabels(tick, fontsize=8.3)
    ax_g.set_xlabel("sgemm shape M×N×K (row-major, C = A·B)")
    ax_g.set_ylabel("% of the measured fp32 FMA peak")
    ax_g.set_title("sgemm, one core", loc="left")
    from matplotlib.patches import Patch
    ax_g.legend(handles=[Patch(color=c, label=g_labels[i]) for i, c in zip(impls, g_colors)],
                loc="upper left", ncol=3, frameon=False, handlelength=1.5, columnspacing=1.2)
    a_series = [False, True]
    a_values = {(c, T): attn_pct[(T, c)] for (T, c) in attn_pct}
    a_colors = [BLUE, "#88aadd"]
    bars(ax_a, attn_T, a_series, a_values, a_colors, 0.36)
    ax_a.set_xticks(range(len(attn_T)))
    ax_a.set_xticklabels([f"T {T}" for T in attn_T])
    ax_a.set_xlabel("sequence length (B 1, H 8, D 64)")
    ax_a.set_title("fused dense attention, one core", loc="left")
    ax_a.legend(handles=[Patch(color=a_colors[0], label="non-causal"),
                         Patch(color=a_colors[1], label="causal")],
                loc="upper left", ncol=2, frameon=False, handlelength=1.5, columnspacing=1.2)
    plt.setp(ax_a.get_yticklabels(), visible=False)
    for ax in (ax_g, ax_a):
        ax.set_ylim(0, ymax)
        ax.axhline(100, color="#444444", linewidth=0.8, linestyle="--")
        ax.grid(axis="y", alpha=0.3)
    ax_g.set_yticks(range(0, 101, 20))
    ax_a.text(len(attn_T) - 0.5, 101, "FMA peak", ha="right", va="bottom", fontsize=8,
              color="#444444")
    titles(fig, h, "Single-thread fp32 throughput as a fraction of the FMA peak",
           f"Useful FLOP/s ÷ the fp32 {isa_name + ' ' if isa_name else ''}FMA peak measured in "
           f"the same process ({peak_text})")
    save(fig, out)
    return {"peak": bench_peak, "peaks": peaks, "isa": isa, "gemm": gemm_pct,
            "attention": attn_pct, "openblas_core": blas_core}


# ----------------------------------------------------------------------------- 3. crossover

LINEAR = re.compile(r"^BM_(?P<kind>Linear|Dense)/(?P<mask>causal|noncausal)/(?P<T>\d+)$")
ROUTING = re.compile(r"^(?P<kind>dense|routing|routing_nearest|plan_full)/(?P<T>\d+)$")


def crossover(ts, speedups):
    """The T where the speed-up last rises through 1 (log-log interpolation), with a flag:
    ('at', T), ('below', T0) when faster at every measured T, ('never', Tmax)."""
    below = [i for i, s in enumerate(speedups) if s < 1.0]
    if not below:
        return ("below", ts[0])
    i = below[-1]
    if i == len(ts) - 1:
        return ("never", ts[-1])
    x0, x1 = math.log(ts[i]), math.log(ts[i + 1])
    y0, y1 = math.log(speedups[i]), math.log(speedups[i + 1])
    return ("at", math.exp(x0 + (0 - y0) * (x1 - x0) / (y1 - y0)))


def chart_crossover(linear, routing, out, machine):
    series = []  # (label, color, style, [(T, speed-up)], comparison)
    if linear:
        t = {}
        for name in linear.names():
            m = LINEAR.match(name)
            if m:
                t[(m["kind"], m["mask"], int(m["T"]))] = linear.value(name, "cpu_time")
        for mask, color, label in (("noncausal", GREEN, "linear attention, non-causal"),
                                   ("causal", BLUE, "linear attention, causal")):
            pts = sorted((T, t[("Dense", mask, T)] / v) for (k, mk, T), v in t.items()
                         if k == "Linear" and mk == mask and ("Dense", mask, T) in t)
            if pts:
                series.append((label, color, "-", pts, f"vs dense {mask.replace('non', 'non-')}"))
    if routing:
        t, xd = {}, {}
        for name in routing.names():
            m = ROUTING.match(name)
            if m:
                t[(m["kind"], int(m["T"]))] = routing.value(name, "cpu_time")
                x = routing.value(name, "x_dense")
                if x:
                    xd[(m["kind"], int(m["T"]))] = x
        for kind, color, style, label in (
                ("routing", ORANGE, "-", "routing attention (k-means, C = √T)"),
                ("routing_nearest", RED, "--", "routing, nearest-centroid clusters")):
            pts = []
            for (k, T), v in sorted(t.items(), key=lambda kv: kv[0][1]):
                if k != kind:
                    continue
                if ("dense", T) in t:  # the dense benchmark of the same run (median)
                    pts.append((T, t[("dense", T)] / v))
                elif (k, T) in xd:  # dense timed once inside the same process
                    pts.append((T, xd[(k, T)]))
            if pts:
                series.append((label, color, style, pts, "vs dense non-causal"))
    if not series:
        raise ChartError("no BM_Linear/BM_Dense or routing/dense benchmarks")

    plt = pyplot()
    fig, h, rect = figure(
        plt, 5.2, machine.footnote(
            linear or routing,
            "Linear attention (elu+1 feature map) is a different model, not an approximation of "
            "softmax attention: this compares cost only. Routing attention: shared QK, "
            "non-causal, C = round(√T) clusters of T/C tokens. T 16384: one repetition, and "
            "routing's reference there is one dense forward timed in the same process "
            "(its x_dense counter)."),
        below_axes_in=0.62, above_axes_in=0.8, left=0.11, right=0.975)
    ax = fig.add_axes(rect)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    all_t = sorted({T for s in series for T, _ in s[3]})
    all_y = [y for s in series for _, y in s[3]]
    ymin, ymax = min(0.15, min(all_y) / 1.4), max(all_y) * 1.8
    ax.axhspan(ymin, 1.0, color="#eeeeee", zorder=0)
    ax.axhline(1.0, color="#444444", linewidth=1.0)
    ax.text(all_t[-1] * 1.05, 0.93, "dense is faster below this line", ha="right", va="top",
            fontsize=8.5, color="#555555")
    results = {}
    marks = []
    for label, color, style, pts, cmp in series:
        ts, ys = [p[0] for p in pts], [p[1] for p in pts]
        kind, where = crossover(ts, ys)
        if kind == "at":
            cross = f"crossover T ≈ {where:.0f}"
            marks.append((where, color))
        elif kind == "below":
            cross = f"faster at every T ≥ {where}"
        else:
            cross = f"slower up to T {where}"
        full = f"{label} ({cmp}): {cross}; {fmt_x(ys[-1])} at T {ts[-1]}"
        ax.plot(ts, ys, style, color=color, marker="o", markersize=4, linewidth=2, label=full)
        ax.annotate(fmt_x(ys[-1]), (ts[-1], ys[-1]), xytext=(5, 0), textcoords="offset points",
                    va="center", fontsize=8.5, color=color, fontweight="bold")
        results[label] = {"points": pts, "crossover": (kind, where), "vs": cmp}
    # Crossover marks on the 1× line, their T written below it on staggered rows (boxed, so
    # they stay readable over the lines).
    marks.sort()
    for n, (x, color) in enumerate(marks):
        ax.plot([x], [1.0], marker="o", markersize=7, markerfacecolor="white",
                markeredgecolor=color, markeredgewidth=2, zorder=5)
        y_text = 0.62 / (1.42 ** n)
        ax.annotate(f"T ≈ {x:.0f}", (x, 1.0), xytext=(x, y_text), ha="center", va="top",
                    fontsize=8.5, color=color, fontweight="bold", zorder=6,
                    bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor=color,
                              linewidth=0.8),
                    arrowprops=dict(arrowstyle="-", color=color, linewidth=1.0))
    ax.set_xticks(all_t)
    ax.set_xticklabels([str(T) for T in all_t])
    ax.minorticks_off()
    ax.set_xlim(all_t[0] / 1.25, all_t[-1] * 1.45)
    ax.set_ylim(ymin, ymax)
    yt = [v for v in (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if ymin <= v <= ymax]
    ax.set_yticks(yt)
    ax.set_yticklabels([f"{v:g}×" for v in yt])
    ax.set_xlabel("sequence length T (tokens, log scale)")
    ax.set_ylabel("speed-up over fused dense attention\n(dense time ÷ method time, same run)")
    ax.grid(alpha=0.3, which="major")
    ax.legend(loc="upper left", fontsize=8.3, frameon=True, framealpha=0.95)
    titles(fig, h, "When do routing and linear attention beat dense attention?",
           "Speed-up over switchyard's fused dense attention against sequence length "
           "(B 1, H 8, D 64, 1 thread); crossovers interpolated")
    save(fig, out)
    return results


# ----------------------------------------------------------------------------- 4. MoE layer

MOE = re.compile(r"^BM_MoELayerVsDense/T:(?P<T>\d+)/E:(?P<E>\d+)/K:(?P<K>\d+)/F:(?P<F>\d+)")
SOFT = re.compile(r"^BM_SoftMoEVsSparse/T:(?P<T>\d+)/E:(?P<E>\d+)/F:(?P<F>\d+)")
KNOWN_MOE = {(8, 2, 2816): "Mixtral-like", (64, 8, 512): "OLMoE-like"}


def chart_moe(runs, out, machine, peak):
    groups = []  # dicts
    for name in runs.names():
        m = MOE.match(name)
        if m:
            T, E, K, F = (int(m[x]) for x in "TEKF")
            groups.append({"T": T, "E": E, "K": K, "F": F,
                           "layer": runs.value(name, "GFLOP/s"),
                           "dense": runs.value(name, "dense_GFLOP/s"),
                           "ratio": runs.value(name, "ratio"),
                           "layer_spread": runs.spread(name, "GFLOP/s"),
                           "dense_spread": runs.spread(name, "dense_GFLOP/s")})
    soft = []
    for name in runs.names():
        m = SOFT.match(name)
        if m:
            soft.append({"T": int(m["T"]), "E": int(m["E"]), "F": int(m["F"]),
                         "gflops": runs.value(name, "GFLOP/s"),
                         "sparse_gflops": runs.value(name, "sparse_GFLOP/s"),
                         "ratio": runs.value(name, "ratio"),
                         "spread": runs.spread(name, "GFLOP/s")})
    if not groups:
        raise ChartError("no BM_MoELayerVsDense benchmarks")
    for s in soft:  # Soft MoE runs top-2 as its sparse twin: join the matching k 2 shape
        match = [g for g in groups if (g["T"], g["E"], g["K"], g["F"]) == (s["T"], s["E"], 2, s["F"])]
        if match:
            match[0]["soft"] = s
        else:
            groups.append({"T": s["T"], "E": s["E"], "K": 2, "F": s["F"], "layer": None,
                           "dense": None, "ratio": None, "soft": s})

    plt = pyplot()
    from matplotlib.patches import Patch
    has_soft = any("soft" in g for g in groups)
    extra = ("Active FLOPs = 2 · (token, expert) pairs · d · F · 3 (gate, up, down). The dense "
             "bars run core::gemm on contiguous [pairs, d] × [d, F] (twice) and [pairs, F] × [F, d]"
             ", timed right after the layer in each iteration. The MoE layer also gathers tokens, "
             "packs weights, applies SwiGLU and combines in slot order.")
    if has_soft:
        extra += ("\nSoft MoE (Puigcerver et al.): one sequence, E · S = 2T slots, so its experts "
                  "do the top-2 layer's expert FLOPs; its GFLOP/s also counts its dispatch and "
                  "combine GEMMs. Its tokens/s is compared with router + top-2 layer.")
    if runs.repetitions() > 1:
        extra += " Whiskers: min-max of the repetitions."
    fig, h, rect = figure(plt, 5.0, machine.footnote(runs, extra), below_axes_in=0.62,
                          above_axes_in=1.1, left=0.085, right=0.9)
    ax = fig.add_axes(rect)
    width = 0.26
    ymax = max(v for g in groups for v in (g["layer"], g["dense"],
                                           g.get("soft", {}).get("gflops")) if v) * 1.28
    for j, g in enumerate(groups):
        n_bars = 2 + ("soft" in g)
        xs = [j - width * n_bars / 2 + (i + 0.5) * width for i in range(n_bars)]
        vals = [(g["layer"], BLUE, g.get("layer_spread")), (g["dense"], GREY, g.get("dense_spread"))]
        if "soft" in g:
            vals.append((g["soft"]["gflops"], PURPLE, g["soft"]["spread"]))
        for x, (v, color, spread) in zip(xs, vals):
            if v is None:
                continue
            ax.bar(x, v, width * 0.92, color=color)
            if spread:
                ax.plot([x, x], spread, color="#222222", linewidth=0.8)
            ax.text(x, v / 2, f"{v:.0f}", ha="center", va="center", fontsize=8.5,
                    color="white", fontweight="bold")
        if g["ratio"] is not None:
            top = max(g["layer"], g["dense"], *(s for s in (g.get("layer_spread") or ()) ),
                      *(s for s in (g.get("dense_spread") or ())))
            y = top * 1.04
            ax.plot([xs[0], xs[0], xs[1], xs[1]], [y * 0.985, y, y, y * 0.985], color="#222222",
                    linewidth=0.9)
            ax.text((xs[0] + xs[1]) / 2, y * 1.01, f"{g['ratio']:.2f}× dense", ha="center",
                    va="bottom", fontsize=9, fontweight="bold")
        if "soft" in g:
            s = g["soft"]
            ax.text(xs[-1], max([s["gflops"], *(s["spread"] or ())]) * 1.03,
                    f"{s['ratio']:.2f}× the\ntokens/s of\ntop-2",
                    ha="center", va="bottom", fontsize=7.8, color=PURPLE, linespacing=1.1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([
        (KNOWN_MOE.get((g["E"], g["K"], g["F"]), "") + "\n").lstrip("\n")
        + f"T {g['T']}, E {g['E']}, k {g['K']}, F {g['F']}" for g in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0, ymax)
    ax.set_ylabel("GFLOP/s (active FLOPs ÷ CPU time)")
    ax.grid(axis="y", alpha=0.3)
    if peak:
        sec = ax.secondary_yaxis("right", functions=(lambda g: 100 * g / peak,
                                                     lambda p: p * peak / 100))
        sec.set_ylabel(f"% of the FMA peak (in-process: {peak:.0f} GFLOP/s)")
        ax.spines["right"].set_visible(True)
    handles = [Patch(color=BLUE, label="MoE layer (MoELayer::execute)"),
               Patch(color=GREY, label="dense GEMMs, same active FLOPs")]
    if has_soft:
        handles.append(Patch(color=PURPLE, label="Soft MoE layer"))
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=len(handles),
              frameon=False, handlelength=1.5)
    titles(fig, h, "MoE layer efficiency against dense GEMM",
           "SwiGLU experts, d 1024, top-k plans over random logits, 1 thread. Label: MoE GFLOP/s "
           "÷ dense GFLOP/s in the same iterations")
    save(fig, out)
    return groups


# ----------------------------------------------------------------------------- driver

class ChartError(Exception):
    pass


def read_run_info(json_dir):
    info = {}
    path = os.path.join(json_dir, "run_info.txt")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    return info


def render_all(json_dir, out_dir, only):
    run_info = read_run_info(json_dir)
    data = {s: load(json_dir, s) for s in (
        "bench_peak", "bench_gemm", "bench_attention", "bench_linear_attention",
        "bench_routing_attention", "bench_moe_layer", "bench_moe_routers")}
    context = next((r.context for r in data.values() if r), {})
    machine = Machine(json_dir, context)
    peak_info = run_peak(data)
    jobs = {
        "routers": ("moe_routers.png", ["bench_moe_routers"],
                    lambda o: chart_routers(data["bench_moe_routers"], o, machine)),
        "peak": ("fraction_of_peak.png", ["bench_gemm", "bench_attention"],
                 lambda o: chart_peak(data["bench_gemm"], data["bench_attention"],
                                      peak_info, o, machine, run_info)),
        "crossover": ("attention_crossover.png",
                      ["bench_linear_attention", "bench_routing_attention"],
                      lambda o: chart_crossover(data["bench_linear_attention"],
                                                data["bench_routing_attention"], o, machine)),
        "moe": ("moe_layer_vs_dense.png", ["bench_moe_layer"],
                lambda o: chart_moe(data["bench_moe_layer"], o, machine,
                                   peak_info[1].get("bench_moe_layer") or peak_info[0])),
    }
    failed = 0
    results = {}
    for name, (png, needs, fn) in jobs.items():
        if only and name not in only:
            continue
        missing = [s for s in needs if not data[s]]
        if name == "crossover" and len(missing) < len(needs):
            missing = []  # either benchmark alone still makes the chart
        if missing:
            print(f"bench_chart: {name}: skipped, no {', '.join(m + '.json' for m in missing)} in "
                  f"{json_dir} (run scripts/make_charts.sh without --render-only)", file=sys.stderr)
            failed += 1
            continue
        out = os.path.join(out_dir, png)
        try:
            results[name] = fn(out)
        except ChartError as e:
            print(f"bench_chart: {name}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"bench_chart: wrote {out}")
    print_summary(results, machine)
    return failed


def print_summary(results, machine):
    """The key numbers, for the README text."""
    if not results:
        return
    print(f"\n-- key numbers ({machine.cpu}, 1 thread)")
    if "routers" in results:
        summary, meta = results["routers"]
        print(f"routers, T {meta['T']}, speed-up over naive_sort "
              f"(naive: {', '.join(f'E {e}: {v:.2f} ms' for e, v in meta['naive_ms'].items())}):")
        for r, cells in summary.items():
            print(f"  {r:22s} " + "  ".join(f"E {e}: {fmt_x(v)}" + (f" (k {k})" if fb else "")
                                            for e, (v, k, fb) in cells.items()))
    if "peak" in results:
        p = results["peak"]
        print(f"FMA peak ({p['isa']}): bench_peak {p['peak'] or 0:.1f} GFLOP/s; in-process: "
              + ", ".join(f"{k} {v:.1f}" for k, v in p["peaks"].items())
              + f"; OpenBLAS core {p['openblas_core']}")
        shapes = sorted({s for _, s in p["gemm"]}, key=lambda s: s[0] * s[1] * s[2])
        for s in shapes:
            row = {i: p["gemm"].get((i, s), (float("nan"),))[0] for i in ("Ours", "Eigen", "OpenBLAS")}
            print(f"  gemm {s}: ours {row['Ours']:.1f} %, Eigen {row['Eigen']:.1f} %, OpenBLAS "
                  f"{row['OpenBLAS']:.1f} %  -> ours/OpenBLAS {row['Ours'] / row['OpenBLAS']:.3f}")
        for (T, c), (v, _) in sorted(p["attention"].items()):
            print(f"  fused attention T {T} {'causal' if c else 'non-causal'}: {v:.1f} % of peak")
    if "crossover" in results:
        for label, r in results["crossover"].items():
            pts = ", ".join(f"{T}: {fmt_x(s)}" for T, s in r["points"])
            kind, where = r["crossover"]
            print(f"  {label} ({r['vs']}): crossover {kind} {where:.0f}; {pts}")
    if "moe" in results:
        for g in results["moe"]:
            line = f"  MoE T {g['T']} E {g['E']} k {g['K']} F {g['F']}: "
            if g["ratio"] is not None:
                line += f"layer {g['layer']:.1f} GFLOP/s, dense {g['dense']:.1f}, ratio {g['ratio']:.3f}"
            if "soft" in g:
                s = g["soft"]
                line += (f"; Soft MoE {s['gflops']:.1f} GFLOP/s (sparse route+layer "
                         f"{s['sparse_gflops']:.1f}), soft/sparse tokens/s {s['ratio']:.3f}")
            print(line)


def main(argv):
    if len(argv) == 3 and argv[1].endswith(".json") and not argv[1].startswith("-"):
        # The original interface: one bench_moe_routers JSON file -> the router chart.
        runs = Runs([argv[1]])
        if not runs:
            sys.exit(f"bench_chart: no benchmarks in {argv[1]}")
        machine = Machine(os.path.dirname(argv[1]) or ".", runs.context)
        try:
            chart_routers(runs, argv[2], machine)
        except ChartError as e:
            sys.exit(f"bench_chart: {e} in {argv[1]}")
        print(f"bench_chart: wrote {argv[2]}")
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--json-dir", default="build/charts", help="where the JSON is (build/charts)")
    p.add_argument("--out-dir", default="docs", help="where the PNGs go (docs)")
    p.add_argument("--only", nargs="*", choices=["routers", "peak", "crossover", "moe"],
                   help="render only these charts")
    args = p.parse_args(argv[1:])
    failed = render_all(args.json_dir, args.out_dir, set(args.only or []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
