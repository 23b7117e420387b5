"""One static HTML page for a bench: the results table and the figures, images inlined."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path


def write_report(summary: dict, images: list[Path], path: Path, title: str) -> Path:
    metrics, gains = summary["metrics"], summary["gains"]
    head = ["model", *metrics, *gains, "parameters", "train seconds"]
    rows = []
    for row in summary["rows"]:
        cells = [row["model"]] + [f"{_num(row[m])} ± {_num(row[m + ' std'])}" for m in metrics]
        cells += [_num(row[g], signed=True) for g in gains] + [f"{row['parameters']:,}", f"{row['seconds']:.1f}"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    figures = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(p.stem)}</figcaption></figure>"
        for p in images if p.exists()
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Test metrics, mean ± std over {summary['rows'][0]['seeds']} seed(s); MTL gain over single_task
(positive: better than the single-task models).</p>
<table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>{''.join(rows)}</table>
{figures}
</body></html>
"""
    path.write_text(page)
    return path


def _num(value: float, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
