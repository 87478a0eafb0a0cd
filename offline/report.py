"""``--report DIR`` for the searches: ``report.json`` plus PNG plots.

The plots are what a reader checks first: whether activation entropy tracks the
measured cross-layer dependency (the paper's premise, measured here, not assumed),
where the block boundaries fell, and how much each block's error dropped from RTN
to the GPTQ start to the searched result.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path


def peak_rss_gib() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write ``report.json`` and the plots into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    written = [path]
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:  # plots are optional; the JSON has every number
        print(f"matplotlib is not installed: wrote {path} without plots", file=sys.stderr)
        return written
    if report.get("layers"):
        written.append(_plot_profile(report, out / "entropy_dependency.png"))
    if report.get("blocks"):
        written.append(_plot_errors(report, out / "block_error.png"))
    return written


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def _plot_profile(report: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    layers = report["layers"]
    idx = [d["index"] for d in layers]
    ent = [d["entropy"] for d in layers]
    dep = [d["dependency_next"] for d in layers[:-1]]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(idx)), 3.5))
    ax.plot(idx, ent, "o-", label="entropy H(X_q^k)")
    ax.plot(idx[:-1], dep, "s--", label="dependency D(k, k+1)")
    for blk in report.get("partition", [])[1:]:
        ax.axvline(blk["start"] - 0.5, color="grey", lw=0.8)
    corr = report.get("correlation") or {}
    title = "activation entropy and cross-layer dependency (lines: block boundaries)"
    if corr:
        title += f"\nPearson {corr.get('pearson', float('nan')):.2f}, Spearman {corr.get('spearman', float('nan')):.2f}"
    ax.set(xlabel="decoder layer", ylabel="nats", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_errors(report: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    blocks = report["blocks"]
    x = list(range(len(blocks)))
    init = report.get("config", {}).get("init", "gptq")
    series = [("RTN", "error_rtn"), (f"{init} start", f"error_{init}"), ("searched", "error_final")]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(x)), 3.5))
    width = 0.8 / len(series)
    for k, (label, key) in enumerate(series):
        ax.bar([i + (k - 1) * width for i in x], [b.get(key) or 0 for b in blocks], width, label=label)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{b['start']}-{b['end'] - 1}" if b["end"] - b["start"] > 1 else str(b["start"])
                      for b in blocks], rotation=90, fontsize=7)
    ax.set(xlabel="block (decoder layers)", ylabel="relative output error", title="block output error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
