"""A self-contained HTML gallery of pipeline results: one section per job.

Image links are relative to the page, so the output directory can be moved or zipped.
"""

from __future__ import annotations

import html
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;background:#f6f5f2;color:#222}
section{background:#fff;border-radius:10px;padding:16px 20px;margin:0 0 24px;box-shadow:0 1px 3px #0002}
.row{display:flex;gap:20px;flex-wrap:wrap;align-items:flex-start}
figure{margin:0}figcaption{font-size:13px;color:#555;margin-top:4px}
img{border-radius:6px;border:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin-top:10px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}th{background:#f0eee9}
tr.chosen td{background:#eaf6ea;font-weight:600}
.ko{font-size:18px}.tags{color:#2a5aa8}.note{color:#777;font-size:12px}
"""

SCORE_COLUMNS = ("vlm_score", "ocr_similarity", "contrast_ratio", "overlap_fraction", "total")


def _rel(path: str | Path | None, base: Path) -> str | None:
    if not path:
        return None
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape("" if v is None else str(v))


def render_gallery(
    jobs: Sequence[Mapping[str, Any]],
    base_dir: str | Path,
    title: str = "Feedly results",
    korean_font: str | None = None,
) -> str:
    """HTML for ``jobs``; each job mapping has job_id, chosen_variant_id, chosen_overlay,
    feed_image, caption_ko, hashtags, optional english, backends, and variants (each with
    variant_id, optional overlay image and the score columns). ``korean_font`` is a URL
    (relative to the page) of a font for the Korean text, for browsers without one."""
    base = Path(base_dir)
    e = html.escape
    face = ""
    if korean_font:
        face = (
            f"@font-face{{font-family:'FeedlyKorean';src:url('{e(korean_font)}')}}"
            "[lang=ko]{font-family:'FeedlyKorean',system-ui,sans-serif}"
        )
    out = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
        f"<style>{_CSS}{face}</style></head><body><h1>{e(title)}</h1>",
    ]
    for job in jobs:
        jid = str(job["job_id"])
        out.append(f"<section id='job-{e(jid)}'><h2>Job {e(jid)}</h2><div class='row'>")
        for label, key, width in (
            ("chosen variant", "chosen_overlay", 320),
            ("feed post", "feed_image", 288),
        ):
            src = _rel(job.get(key), base)
            if src:
                out.append(
                    f"<figure><img src='{e(src)}' width='{width}' alt='{e(label)}'>"
                    f"<figcaption>{e(label)}</figcaption></figure>"
                )
        out.append("<div>")
        out.append(f"<p>chosen: <b>{e(str(job.get('chosen_variant_id', '')))}</b></p>")
        if job.get("english"):
            out.append(f"<p>{e(str(job['english']))}</p>")
        out.append(f"<p class='ko' lang='ko'>{e(str(job.get('caption_ko', '')))}</p>")
        out.append(f"<p class='tags' lang='ko'>{e(' '.join(job.get('hashtags', [])))}</p>")
        if job.get("backends"):
            out.append(f"<p class='note'>backends: {e(str(job['backends']))}</p>")
        out.append("</div></div>")
        out.append(
            "<table><tr><th>variant</th><th>overlay</th>"
            + "".join(f"<th>{c}</th>" for c in SCORE_COLUMNS)
            + "</tr>"
        )
        for v in job.get("variants", []):
            cls = (
                " class='chosen'"
                if str(v.get("variant_id")) == str(job.get("chosen_variant_id"))
                else ""
            )
            thumb = _rel(v.get("overlay_image"), base)
            img = f"<img src='{e(thumb)}' width='96' alt='overlay'>" if thumb else ""
            cells = "".join(f"<td>{_fmt(v.get(c))}</td>" for c in SCORE_COLUMNS)
            out.append(f"<tr{cls}><td>{e(str(v.get('variant_id')))}</td><td>{img}</td>{cells}</tr>")
        out.append("</table></section>")
    out.append("</body></html>")
    return "\n".join(out)


def write_gallery(
    out_path: str | Path, jobs: Sequence[Mapping[str, Any]], title: str = "Feedly results"
) -> Path:
    """Write the gallery page; links are relative to its folder. A Korean font, when one is
    found, is copied beside the page so the captions render in any browser."""
    from .feed import find_korean_font

    p = Path(out_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    font = find_korean_font()
    font_url = None
    if font:
        copied = p.parent / ("korean" + Path(font).suffix)
        if not copied.exists():
            shutil.copyfile(font, copied)
        font_url = copied.name
    p.write_text(render_gallery(jobs, p.parent, title, font_url), encoding="utf-8")
    return p
