"""PNG plots of a `duoserve bench compare` or `bench peer` report (compare.json, peer.json), with matplotlib.

  attainment.png   SLO attainment against request rate, one line per configuration (or system), the target dashed
  goodput.png      goodput (requests/s meeting both SLOs) against request rate, with y = x for reference
  latency_cdf.png  CDFs of TTFT and TPOT per configuration, one column per rate, the SLOs dotted

matplotlib is imported only here, and only when plotting (the Agg backend: no display needed).
Redraw from a saved report: python -m bench.plots DIR/compare.json (or DIR/peer.json)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

INSTALL_HINT = ("matplotlib is needed for the plots: `pip install matplotlib` in the virtualenv "
                "(or pass --no-plots)")


def require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(report: dict[str, Any], name: str, key: str) -> tuple[list[float], list[float]]:
    runs = report["results"][name]["runs"]
    return [r["rate"] for r in runs], [r["result"]["metrics"][key] for r in runs]


def plot_comparison(report: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = require_matplotlib()
    names = list(report["results"])
    target = report["attainment_target"]
    slo = f"TTFT <= {report['slo_ttft_ms']:g} ms, TPOT <= {report['slo_tpot_ms']:g} ms"
    heading = report.get("heading")         # bench peer: what was compared on which machine, a line above
    per_conversation = report.get("arrival", {}).get("per") == "conversation"   # multi-turn: the rate starts them
    unit = "conversations/s" if per_conversation else "req/s"
    paths: list[Path] = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        rates, att = _series(report, name, "slo_attainment")
        best = report["summary"][name]["max_rate_text"]
        ax.plot(rates, [a * 100 for a in att], marker="o", label=f"{name} (max {best})")
    ax.axhline(target * 100, color="gray", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set(xlabel=f"{'conversation start' if per_conversation else 'request'} rate ({unit})",
           ylabel="SLO attainment (%)", ylim=(0, 105),
           title=_title(heading, f"Attainment ({slo})"))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / "attainment.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    top = max(report["rates"])
    if not per_conversation:                # a conversation is several requests: no such line
        ax.plot([0, top], [0, top], color="gray", linestyle=":", linewidth=1, label="goodput = rate")
    for name in names:
        rates, good = _series(report, name, "request_goodput")
        ax.plot(rates, good, marker="o", label=name)
    ax.set(xlabel=f"{'conversation start' if per_conversation else 'request'} rate ({unit})",
           ylabel="goodput (req/s meeting both SLOs)",
           title=_title(heading, f"Goodput ({slo})"))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / "goodput.png"))

    rates = report["rates"]
    fig, axes = plt.subplots(2, len(rates), figsize=(4 * len(rates), 6.5), squeeze=False)
    for col, rate in enumerate(rates):
        for row, (metric, target_ms) in enumerate((("ttft", report["slo_ttft_ms"]), ("tpot", report["slo_tpot_ms"]))):
            ax = axes[row][col]
            for name in names:
                run = next((r for r in report["results"][name]["runs"] if r["rate"] == rate), None)
                if run is None:
                    continue
                ok = [r for r in run["result"]["records"] if r["success"]]
                values = sorted(r[f"{metric}_s"] * 1000 for r in ok if metric == "ttft" or r["output_tokens"] > 1)
                if values:
                    ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=name)
            ax.axvline(target_ms, color="gray", linestyle=":", linewidth=1)
            ax.set(xlabel=f"{metric.upper()} (ms)", ylabel="fraction of requests", ylim=(0, 1.02),
                   title=f"{metric.upper()} at {rate:g} {unit}")
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    if heading:
        fig.suptitle(heading, fontsize=8)       # fits one 4-inch column
    paths.append(_save(fig, out_dir / "latency_cdf.png"))
    return paths


def _title(heading: str | None, title: str) -> str:
    return f"{heading}\n{title}" if heading else title


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


if __name__ == "__main__":
    report_path = Path(sys.argv[1])
    for p in plot_comparison(json.loads(report_path.read_text()), report_path.parent):
        print(p)
