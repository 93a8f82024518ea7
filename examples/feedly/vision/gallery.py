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
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f3f1ec;color:#1d1d1f}
header,main,footer{max-width:1320px;margin:0 auto;padding:0 24px}
header{padding-top:28px;padding-bottom:8px}
h1{font-size:28px;margin:0 0 4px}.sub{color:#555;margin:0 0 16px;font-size:15px}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,560px),1fr));gap:24px}
.post{background:#fff;border-radius:14px;box-shadow:0 1px 4px #0002;overflow:hidden}
.head{display:flex;justify-content:space-between;align-items:baseline;padding:14px 18px}
.who{font-weight:650}.meta{color:#666;font-size:13px}
.feed{display:block;width:100%;height:auto;background:#eee}
.caption{padding:14px 18px 4px;font-size:18px;line-height:1.45}
.tags{padding:0 18px 6px;color:#1f5fbf;font-size:16px;line-height:1.5}
.en{padding:0 18px 10px;color:#555;font-size:14px}
details{border-top:1px solid #eee;padding:10px 18px 14px}
summary{cursor:pointer;color:#333;font-size:14px}
.variants{display:flex;gap:12px;margin:12px 0 6px;flex-wrap:wrap}
.variants figure{margin:0;width:132px;font-size:12px;color:#444;text-align:center}
.variants img{width:132px;height:132px;object-fit:cover;border-radius:8px;border:3px solid transparent}
.variants .chosen img{border-color:#2e9e5b}
.variants .chosen figcaption{color:#1e7a43;font-weight:650}
table{border-collapse:collapse;font-size:13px;margin-top:8px;width:100%}
td,th{border-bottom:1px solid #eee;padding:5px 6px;text-align:right}
th:first-child,td:first-child{text-align:left}
th{color:#555;font-weight:600}tr.chosen td{background:#eef8f1;font-weight:600}
.failed{color:#a33;font-size:13px;margin:4px 12px}
footer{color:#666;font-size:13px;padding-top:24px;padding-bottom:32px}
"""

#: Score columns of the "why this variant" table, in the words a marketer would use.
SCORE_COLUMNS = {
    "total": "overall",
    "vlm_score": "image check",
    "ocr_similarity": "text reads back",
    "contrast_ratio": "contrast (WCAG)",
    "overlap_fraction": "text over product",
}


def _rel(path: str | Path | None, base: Path) -> str | None:
    if not path:
        return None
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def _fmt(column: str, v: Any) -> str:
    if v is None:
        return "-"
    if column == "contrast_ratio":
        return f"{float(v):.1f}:1"
    if column == "overlap_fraction":
        return f"{100 * float(v):.0f}%"
    if isinstance(v, float):
        return f"{100 * v:.0f}"
    return html.escape(str(v))


def _backends(text: str) -> str:
    """``detector=...; vlm=...`` in plain words, with file paths reduced to file names."""
    names = {
        "detector": "objects",
        "vlm": "image checks",
        "translator": "Korean copy",
        "korean font": "Korean font",
    }
    parts = []
    for item in text.split(";"):
        key, _, value = item.strip().partition("=")
        if "/" in value or "\\" in value:
            value = Path(value).name
        parts.append(f"{names.get(key, key)}: {value}")
    return " · ".join(parts)


def _post(job: Mapping[str, Any], base: Path) -> str:
    e = html.escape
    jid = str(job["job_id"])
    chosen = str(job.get("chosen_variant_id", ""))
    variants = list(job.get("variants", []))
    who = " · ".join(str(job[k]) for k in ("tenant_id", "product") if job.get(k))
    out = [
        f"<article class='post' id='job-{e(jid)}'>",
        f"<div class='head'><span class='who'>Job {e(jid)}{' · ' + e(who) if who else ''}</span>"
        f"<span class='meta'>best of {len(variants)} variant{'s' * (len(variants) != 1)}</span></div>",
    ]
    feed = _rel(job.get("feed_image"), base) or _rel(job.get("chosen_overlay"), base)
    if feed:
        out.append(f"<img class='feed' src='{e(feed)}' alt='feed post of job {e(jid)}'>")
    out.append(f"<p class='caption' lang='ko'>{e(str(job.get('caption_ko', '')))}</p>")
    out.append(f"<p class='tags' lang='ko'>{e(' '.join(job.get('hashtags', [])))}</p>")
    if job.get("english"):
        out.append(f"<p class='en'>{e(str(job['english']))}</p>")
    for failed in job.get("failed_variants", []):
        error = str(failed.get("error") or "no error recorded").strip().splitlines()
        out.append(
            f"<p class='failed'>Variant {e(str(failed.get('variant_id')))} was left out: it "
            f"failed at {e(str(failed.get('stage')))} ({e(error[-1] if error else '')}).</p>"
        )
    out.append(f"<details><summary>Why variant {e(chosen)}: the scores</summary>")
    out.append("<div class='variants'>")
    for v in variants:
        vid = str(v.get("variant_id"))
        thumb = _rel(v.get("overlay_image"), base)
        mark = " class='chosen'" if vid == chosen else ""
        img = f"<img src='{e(thumb)}' alt='variant {e(vid)}'>" if thumb else ""
        label = f"variant {e(vid)}: {_fmt('total', v.get('total'))}"
        out.append(f"<figure{mark}>{img}<figcaption>{label}</figcaption></figure>")
    out.append("</div><table><tr><th>variant</th>")
    out.append("".join(f"<th>{e(name)}</th>" for name in SCORE_COLUMNS.values()) + "</tr>")
    for v in variants:
        vid = str(v.get("variant_id"))
        mark = " class='chosen'" if vid == chosen else ""
        cells = "".join(f"<td>{_fmt(c, v.get(c))}</td>" for c in SCORE_COLUMNS)
        out.append(f"<tr{mark}><td>{e(vid)}</td>{cells}</tr>")
    out.append("</table></details></article>")
    return "\n".join(out)


def render_gallery(
    jobs: Sequence[Mapping[str, Any]],
    base_dir: str | Path,
    title: str = "Feedly results",
    korean_font: str | None = None,
    subtitle: str = "",
) -> str:
    """HTML for ``jobs``: one card per post, as it would appear in a feed (image, Korean
    caption, hashtags), with the variants it was chosen from and their scores folded
    away. Each job mapping has job_id, chosen_variant_id, feed_image, caption_ko, hashtags,
    optional tenant_id, product, english, backends, failed_variants (variant_id, stage,
    error: the variants left out), and variants (variant_id, overlay_image and the score
    columns). ``korean_font`` is a URL (relative to the page) of a font for
    the Korean text, for browsers without one."""
    base = Path(base_dir)
    e = html.escape
    face = ""
    if korean_font:
        face = (
            f"@font-face{{font-family:'FeedlyKorean';src:url('{e(korean_font)}')}}"
            "[lang=ko]{font-family:'FeedlyKorean',system-ui,sans-serif}"
        )
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>{e(title)}</title><style>{_CSS}{face}</style></head><body>",
        f"<header><h1>{e(title)}</h1>",
        f"<p class='sub'>{e(subtitle)}</p>" if subtitle else "",
        "</header><main>",
        *(_post(job, base) for job in jobs),
        "</main>",
    ]
    notes = sorted({_backends(str(j["backends"])) for j in jobs if j.get("backends")})
    if notes:
        out.append(f"<footer>Made with {e('; '.join(notes))}.</footer>")
    out.append("</body></html>")
    return "\n".join(out)


def write_gallery(
    out_path: str | Path,
    jobs: Sequence[Mapping[str, Any]],
    title: str = "Feedly results",
    subtitle: str = "",
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
    p.write_text(render_gallery(jobs, p.parent, title, font_url, subtitle), encoding="utf-8")
    return p
