"""`keras-perceiver bench-report`: result files of `bench` (several machines) merged into one
Markdown matrix, opened by a `summary` of our best routes against the originals, and a PNG
plot."""

import json
import statistics
from pathlib import Path

from keras_perceiver.benchmarks.cells import PAIR_BLOCK_S


def _precision(cell):
    """"float32", or the reduced precision a cell (ours or a peer's) ran in: "int8", "bfloat16", "float16"."""
    return next((kind for kind in ("int8", "bfloat16", "float16") if kind in cell["mode"]), "float32")


def _reduced(cell):
    """Whether a cell ran in reduced precision (a quantized, float16 or bfloat16 artefact)."""
    return _precision(cell) != "float32"


def _machine(device):
    """A run's machine as the report names it: CPU x threads, + accelerators."""
    accelerators = f" + {', '.join(device['accelerators'])}" if device["accelerators"] else ""
    return f"{device['cpu']} x{device['threads']}{accelerators}"


def _fastest_peer(peers, cell):
    """The fastest peer of the cell's preset and batch in the cell's precision, else in float32 (the
    reduced-precision targets are set against the float32 peers); None if there is none."""
    same = [p for p in peers if p["preset"] == cell["preset"] and p["batch"] == cell["batch"]]
    matching = [p for p in same if _precision(p) == _precision(cell)] or [p for p in same if not _reduced(p)]
    return min(matching, key=lambda p: p["median_ms"], default=None)


def _span(values, digits, unit):
    """"low-high" + unit, or one value where the two print the same."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return (low if low == high else f"{low}-{high}") + unit


def _ms(ms):
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"  # millisecond models keep two digits

TIMED_AGAINST_PEER = ("in alternation", "same run", "another run")  # how a summary ratio was timed, best first


def summary(results):
    """Markdown: per machine, preset, batch and precision, our route with the best median ratio to
    the peer over every run given, and the range of that ratio over the runs.

    A cell timed in alternation with its peer (`--paired`) is compared in those rounds; otherwise
    with the fastest peer of its own run, else of another run on the same machine (drift between
    runs enters that ratio; the column says which). The peer is one that ran in the cell's
    precision where there is one, else a float32 one."""
    runs = [(_machine(run_["device"]), run_) for data in results for run_ in data["runs"]]
    peers_on = {}
    for machine, run_ in runs:
        peers_on.setdefault(machine, []).extend(run_.get("peers", []))
    routes = {}  # (machine, preset, batch, precision, route) -> [(ratio, how timed, peer, cell)]
    for machine, run_ in runs:
        for c in run_["cells"]:
            key = (machine, c["preset"], c["batch"], _precision(c), f"{c['backend']} {c['mode']}")
            if "paired_peer_ms" in c:
                routes.setdefault(key, []).append((c["paired_peer_ms"] / c["median_ms"], "in alternation", c["paired_peer"], c))
                continue
            for how, pool in (("same run", run_.get("peers", [])), ("another run", peers_on[machine])):
                peer = _fastest_peer(pool, c)
                if peer:
                    routes.setdefault(key, []).append((peer["median_ms"] / c["median_ms"], how, peer["peer"], c))
                    break
    best = {}
    for key, measured in routes.items():
        ratio = statistics.median(m[0] for m in measured)
        if key[:4] not in best or ratio > best[key[:4]][0]:
            best[key[:4]] = (ratio, key[4], measured)
    lines = [
        "| machine | preset | batch | precision | our best route | runs | ms (median of the runs) | % of GEMM peak "
        "| peer | peer time / our time | timed against the peer | peer bf16 autocast / our time | error / output range |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group in sorted(best, key=lambda g: (g[0], g[1], g[2], g[3] != "float32", g[3])):
        machine, preset, batch, precision = group
        _, route, measured = best[group]
        cells = [m[3] for m in measured]
        # int8 has no measured peak of its own; against the float32 one it reads over 100%
        peak = "-" if precision == "int8" else _span([100 * c["fraction_of_peak"] for c in cells], 0, "%")
        errors = [c["max_rel_error"] for c in cells if "max_rel_error" in c]
        autocast = [c["paired_peer_autocast_ms"] / c["median_ms"] for c in cells if "paired_peer_autocast_ms" in c]
        lines.append(
            f"| {machine} | {preset} | {batch} | {precision} | {route} | {len(cells)} | "
            f"{_ms(statistics.median(c['median_ms'] for c in cells))} | {peak} | "
            f"{', '.join(sorted({m[2] for m in measured}))} | {_span([m[0] for m in measured], 2, 'x')} | "
            f"{', '.join(how for how in TIMED_AGAINST_PEER if how in {m[1] for m in measured})} | "
            f"{_span(autocast, 2, 'x') if autocast else '-'} | {f'{max(errors):.1e}' if errors else '-'} |"
        )
    return "\n".join(lines)


def fastest_routes(results):
    """Plain text: per machine, preset and batch, our fastest route in each precision (median ms
    and the error it costs), the recommendation `keras-perceiver bench` prints after a run."""
    best = {}
    for data in results:
        for run_ in data["runs"]:
            machine = _machine(run_["device"])
            for c in run_["cells"]:
                key = (machine, c["preset"], c["batch"], _precision(c))
                if key not in best or c["median_ms"] < best[key]["median_ms"]:
                    best[key] = c
    lines = []
    for key in sorted(best, key=lambda k: (k[0], k[1], k[2], k[3] != "float32", k[3])):
        machine, preset, batch, precision = key
        c = best[key]
        error = f", error {c['max_rel_error']:.1e} of the output range" if "max_rel_error" in c else ""
        lines.append(f"{machine}: {preset} batch {batch}, {precision}: use {c['backend']} {c['mode']} "
                     f"({_ms(c['median_ms'])} ms{error})")
    return "\n".join(lines)


def headline(results):
    """The README's few rows of `summary`: batch 1, the presets at their real sizes, and a
    machine's small configurations only where it ran no real-size preset."""
    header, rule, *rows = summary(results).splitlines()
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    real_size = {c[0] for c in cells if not c[1].startswith("small_")}
    kept = [row for row, c in zip(rows, cells) if c[2] == "1" and (c[0] not in real_size or not c[1].startswith("small_"))]
    return "\n".join([header, rule, *kept])


def report(paths, markdown_out=None, plot_out=None):
    """Merge result files (several machines) into one Markdown document (and a PNG plot): the
    files it came from, the `summary` of our best routes, then every cell and the peers."""
    lines = [
        "| machine | preset | backend | mode | batch | median ms | spread ms | compile s | peak RSS MB | peak device MB | GFLOP | GFLOP/s | % of GEMM peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    results = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "runs" not in data:
            raise ValueError(f"bench-report: expected result files of `keras-perceiver bench`; received {str(path)!r}")
        results.append(data)
        for run_ in data["runs"]:
            machine = _machine(run_["device"])
            for c in run_["cells"]:
                rows.append((machine, c))
                lines.append(
                    f"| {machine} | {c['preset']} | {c['backend']} | {c['mode']} | {c['batch']} | {c['median_ms']:.1f} | "
                    f"{c['spread_ms']:.1f} | {c['compile_s']:.1f} | {c['peak_rss_mb']:.0f} | "
                    f"{'%.0f' % c['peak_device_mb'] if c.get('peak_device_mb') else '-'} | {c['gflop']:.1f} | "
                    f"{c['achieved_gflops']:.1f} | {100 * c['fraction_of_peak']:.0f}% "
                    f"(peak {c.get('peak_gflops', run_['gemm_peak_gflops']):.0f}{' bf16' if 'bfloat16' in c['mode'] else ''}) |"
                )
    peer_lines = [
        "",
        "| machine | preset | batch | peer | peer mode | peer ms | peer % of GEMM peak | our best, same precision | our ms "
        "| peer time / our time | our best reduced precision | its ms | peer time / its time | its error / output range |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data in results:
        ours = [c for run_ in data["runs"] for c in run_["cells"]]
        for run_ in data["runs"]:
            machine = _machine(run_["device"])
            for p in run_.get("peers", []):
                # a bfloat16 peer is compared with our bfloat16 cells, a float32 one with our float32
                # cells and, in the reduced-precision columns, with our fastest reduced-precision cell
                same = [c for c in ours if c["preset"] == p["preset"] and c["batch"] == p["batch"]]
                matching = [c for c in same if _reduced(c) == _reduced(p)]
                if not matching:
                    continue
                best = min(matching, key=lambda c: c["median_ms"])
                peer_fraction = best["gflop"] / (p["median_ms"] / 1000) / (p.get("peak_gflops") or run_["gemm_peak_gflops"])
                reduced = None if _reduced(p) else min([c for c in same if _reduced(c)], key=lambda c: c["median_ms"], default=None)
                reduced_cells = "- | - | - | -"
                if reduced:
                    error = f"{reduced['max_rel_error']:.1e}" if "max_rel_error" in reduced else "-"
                    reduced_cells = (f"{reduced['mode']} | {reduced['median_ms']:.1f} | "
                                     f"{p['median_ms'] / reduced['median_ms']:.2f}x | {error}")
                peer_lines.append(
                    f"| {machine} | {p['preset']} | {p['batch']} | {p['peer']} | {p['mode']} | {p['median_ms']:.1f} | "
                    f"{100 * peer_fraction:.0f}% | {best['backend']} {best['mode']} | {best['median_ms']:.1f} | "
                    f"{p['median_ms'] / best['median_ms']:.2f}x | {reduced_cells} |"
                )
    if len(peer_lines) > 3:
        lines += peer_lines
    paired = [(machine, c) for machine, c in rows if "paired_peer_ms" in c]
    if paired:
        lines += [
            "", "Timed in alternation with the float32 peer, in one process (rounds of ours, then the peer, each side about "
            f"{PAIR_BLOCK_S:g} s of back-to-back calls; a spread is that of the rounds' per-call means):", "",
            "| machine | preset | batch | ours | ms | spread ms | peer | peer ms, same rounds | spread ms | peer time / our time |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ] + [
            f"| {machine} | {c['preset']} | {c['batch']} | {c['backend']} {c['mode']} | {c['median_ms']:.1f} | {c['spread_ms']:.1f} | "
            f"{c['paired_peer']} | {c['paired_peer_ms']:.1f} | {c['paired_peer_spread_ms']:.1f} | {c['paired_peer_ms'] / c['median_ms']:.2f}x |"
            for machine, c in paired
        ]
    failed = [(_machine(run_["device"]), f) for data in results for run_ in data["runs"] for f in run_.get("failed_cells", [])]
    if failed:
        lines += ["", "Not measured:", ""] + [
            f"- {machine}: {f['preset']} {f['mode']}, batch {', '.join(map(str, f['batches']))}: {f['error']}" for machine, f in failed
        ]
    names = ", ".join(Path(path).name for path in paths)
    table = "\n".join([
        f"Merged from: {names}", "",
        "Our best route per machine, preset, batch and precision: the highest median ratio to the peer (its range over the runs):", "",
        summary(results), "", "Every cell:", "",
    ] + lines)
    if markdown_out:
        Path(markdown_out).write_text(table + "\n")
    if plot_out and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{c['preset']} b{c['batch']}  {c['backend']} {c['mode']}" for _, c in rows]
        machines = list(dict.fromkeys(machine for machine, _ in rows))  # one colour per machine
        colours = [f"C{machines.index(machine) % 10}" for machine, _ in rows]
        fig, ax = plt.subplots(figsize=(9, 1 + 0.2 * len(rows)))  # one readable row per cell
        ax.barh(range(len(rows)), [100 * c["fraction_of_peak"] for _, c in rows], color=colours)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("% of the run's measured GEMM peak in the cell's precision (float32; bfloat16 cells: bfloat16)")
        handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{i % 10}") for i in range(len(machines))]
        ax.legend(handles, machines, fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(plot_out, dpi=120)
    return table

