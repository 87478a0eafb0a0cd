"""Markdown tables for docs/results.md from a `benchmarks/qvlm_results.sh` work directory.

    python benchmarks/results_table.py WORKDIR [--json OUT]

Reads ``WORKDIR/compare.json`` (``qvlm compare``), each model's ``/usr/bin/time -v``
file (wall time, peak RSS of ``qvlm quantize``) and its ``--report`` (search blocks).
Prints one table per scheme (rtn, gptq, qvlm and any ablation of that scheme) and says,
per scheme, whether qvlm has the lowest KL and the highest top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _time_file(path: Path) -> dict:
    out = {}
    if not path.exists():
        return out
    text = path.read_text()
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    if m:
        parts = [float(p) for p in m.group(1).split(":")]
        out["wall_s"] = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    cpu = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
    if cpu:
        out["cpu_s"] = sum(cpu)  # robust to a shared machine, unlike wall time
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["peak_rss_gb"] = int(m.group(1)) * 1024 / 1e9
    return out


def _block_error(report: Path) -> float | None:
    """Mean over blocks of the final relative block error (the search's own objective)."""
    if not (report / "report.json").exists():
        return None
    blocks = json.loads((report / "report.json").read_text()).get("blocks") or []
    errs = [b["error_final"] for b in blocks if b.get("error_final") is not None]
    return sum(errs) / len(errs) if errs else None


def collect(workdir: Path) -> dict:
    res = json.loads((workdir / "compare.json").read_text())
    rows = {}
    for name, r in res["models"].items():
        model = Path(name).name
        scheme, _, variant = model.partition("-")
        rows[model] = {"scheme": scheme, "variant": variant, **r, **_time_file(workdir / f"{model}.time"),
                       "mean_block_error": _block_error(workdir / f"{model}.report")}
    return {"float_accuracy": res["float_accuracy"], "settings": res["settings"], "rows": rows}


def _fmt_time(s: float | None) -> str:
    if s is None:
        return ""
    return f"{int(s // 60)}:{int(s % 60):02d}"


def tables(data: dict) -> str:
    out = []
    schemes = list(dict.fromkeys(r["scheme"] for r in data["rows"].values()))
    for s in schemes:
        rows = {k: r for k, r in data["rows"].items() if r["scheme"] == s}
        out += [f"### {s}", "",
                "| model | KL(fp‖q) | top-1 agreement | easy-VQA acc. | quantize CPU time | wall | peak RSS |",
                "|---|---|---|---|---|---|---|"]
        for k, r in rows.items():
            rss = f"{r['peak_rss_gb']:.2f} GB" if "peak_rss_gb" in r else ""
            out.append(f"| {r['variant']} | {r['kl']:.4f} | {100 * r['top1_agreement']:.1f}% | "
                       f"{100 * r['accuracy']:.1f}% | {_fmt_time(r.get('cpu_s'))} | "
                       f"{_fmt_time(r.get('wall_s'))} | {rss} |")
        base = {v: rows.get(f"{s}-{v}") for v in ("rtn", "gptq", "qvlm")}
        if all(base.values()):
            q = base["qvlm"]
            kl_win = all(q["kl"] < base[v]["kl"] for v in ("rtn", "gptq"))
            t1_win = all(q["top1_agreement"] >= base[v]["top1_agreement"] for v in ("rtn", "gptq"))
            out += ["", f"qvlm lowest KL: {'yes' if kl_win else 'NO'}; highest top-1: {'yes' if t1_win else 'NO'} "
                    f"(KL vs gptq: {q['kl'] / base['gptq']['kl']:.2f}x)"]
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path, help="work directory of benchmarks/qvlm_results.sh")
    ap.add_argument("--json", type=Path, default=None, help="also write the collected numbers here")
    args = ap.parse_args()
    data = collect(args.workdir)
    print(f"float model easy-VQA accuracy: {100 * data['float_accuracy']:.1f}%  settings: {data['settings']}\n")
    print(tables(data))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
