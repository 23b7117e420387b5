"""One static HTML page for a bench: the results table and the figures, images inlined."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from mtlrec.bench import paired_cells, table_cells


def _table(head: list[str], cells: list[list[str]]) -> str:
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in head)}</tr>{rows}</table>"


def write_report(summary: dict, images: list[Path], path: Path, title: str) -> Path:
    """The primary metrics with the MTL gain, the paired differences, every metric, the figures."""
    paired = ""
    if summary.get("paired"):
        paired = ("<h2>Paired differences</h2><p>Seed by seed (positive: the model did better than the "
                  "other); mean [95% paired-t interval], seeds won, exact sign-flip p.</p>"
                  + _table(*paired_cells(summary)))
    every = ""
    if [m for m in summary.get("all_metrics", []) if m not in summary["metrics"]]:
        every = "<h2>Every metric</h2>" + _table(*table_cells(summary, summary["all_metrics"]))
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
{_table(*table_cells(summary))}
{paired}
{every}
{figures}
<script>/* for a browser check: how many figures decoded (mtlrec's tests read it) */
addEventListener("load", () => {{ const all = [...document.images];
  document.body.dataset.imagesLoaded = all.filter(i => i.complete && i.naturalWidth > 0).length + " of " + all.length; }});
</script>
</body></html>
"""
    path.write_text(page)
    return path
