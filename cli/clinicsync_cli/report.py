"""``clinicsync report``: one self-contained HTML page (inline CSS and SVG, nothing fetched) with the sync's
health over time and the clinic's funnel by lead source. Counts only: no patient appears in it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from html import escape

from clinicsync.adapters.aws.health import HealthSummary
from clinicsync_cli.funnel import STEPS, Funnel, FunnelRow

# One colour per funnel step; the screenshot test looks for them.
COLOURS = {"entries": "#4e79a7", "booked": "#f28e2b", "visited": "#59a14f", "won": "#e15759"}
LABELS = {"entries": "Lead", "booked": "Booked", "visited": "Visited", "won": "Won"}
HEALTH_COLOUR = "#76b7b2"
ERROR_COLOUR = "#b07aa1"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "–"


def _funnel_row(row: FunnelRow, scale: int, strong: bool = False) -> str:
    bars = []
    for step in STEPS:
        value = row.step(step)
        width = max(0.0, 100 * value / scale) if scale else 0.0
        conv = "" if step == "entries" else f" <span class=conv>{_pct(value, row.entries)}</span>"
        bars.append(
            f"<div class=bar-line><span class=step>{LABELS[step]}</span>"
            f'<span class=track><span class=bar style="width:{width:.1f}%;background:{COLOURS[step]}"></span></span>'
            f"<span class=value>{value}{conv}</span></div>"
        )
    title = f"<strong>{escape(row.source)}</strong>" if strong else escape(row.source)
    return f"<div class=source><div class=source-name>{title}</div>{''.join(bars)}</div>"


def _health_svg(health: HealthSummary, since: datetime, until: datetime) -> str:
    """Messages synced per 6 hours (bars), errors (marks) and the average sync lag (line)."""
    slot = timedelta(hours=6)
    slots = max(1, int((until - since) / slot) + 1)
    synced = [0.0] * slots
    errors = [0.0] * slots
    lag_sum = [0.0] * slots
    for bucket in health.buckets:
        index = int((bucket.start - since) / slot)
        if 0 <= index < slots:
            synced[index] += bucket.get("messages")
            errors[index] += bucket.get("errors")
            lag_sum[index] += bucket.get("lag_sum")
    width, height, pad = 900, 220, 30
    step = (width - 2 * pad) / slots
    top = max([*synced, 1.0])
    lags = [lag_sum[i] / synced[i] if synced[i] else 0.0 for i in range(slots)]
    top_lag = max([*lags, 1.0])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="sync health">'
    ]
    parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>')
    points = []
    for i in range(slots):
        x = pad + i * step
        h = (height - 2 * pad) * synced[i] / top
        if synced[i]:
            parts.append(
                f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{max(step - 1, 1):.1f}" height="{h:.1f}" '
                f'fill="{HEALTH_COLOUR}"><title>{int(synced[i])} messages</title></rect>'
            )
        if errors[i]:
            parts.append(
                f'<rect x="{x:.1f}" y="{pad - 12}" width="{max(step - 1, 2):.1f}" height="8" fill="{ERROR_COLOUR}"/>'
            )
        if synced[i]:  # the lag line joins the slots that synced something
            points.append(f"{x + step / 2:.1f},{height - pad - (height - 2 * pad) * lags[i] / top_lag:.1f}")
    if len(points) > 1:
        parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="#333" stroke-width="1.5"/>')
    for point in points:
        cx, cy = point.split(",")
        parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="#333"/>')
    parts.append(f'<text x="{pad}" y="{height - 8}" font-size="11">{since:%d.%m}</text>')
    parts.append(f'<text x="{width - pad - 40}" y="{height - 8}" font-size="11">{until:%d.%m}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_report(clinic_id: str, funnel: Funnel, health: HealthSummary, generated: datetime | None = None) -> str:
    now = generated or datetime.now(UTC)
    total = funnel.total()
    scale = max([total.entries, 1])
    rows = "".join(_funnel_row(r, max(r.entries, 1)) for r in funnel.rows)
    since = funnel.since
    messages = int(health.total("messages"))
    errors = int(health.total("errors"))
    lag = health.total("lag_sum") / messages if messages else 0.0
    throttles = int(health.total("crm_throttles"))
    requests = int(health.total("crm_requests"))
    legend = "".join(f'<span class=key><i style="background:{COLOURS[s]}"></i>{LABELS[s]}</span>' for s in STEPS)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clinicsync · {escape(clinic_id)}</title>
<style>
body{{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px 32px;color:#222;background:#fff}}
h1{{font-size:22px;margin:0 0 4px}} h2{{font-size:17px;margin:28px 0 8px}}
.muted{{color:#666;font-size:13px}}
.tiles{{display:flex;gap:12px;margin:14px 0}}
.tile{{border:1px solid #ddd;border-radius:8px;padding:10px 14px;min-width:130px}}
.tile b{{display:block;font-size:22px}}
.source{{margin:10px 0 14px}} .source-name{{font-size:14px;margin-bottom:4px}}
.bar-line{{display:flex;align-items:center;height:22px}}
.step{{width:70px;font-size:12px;color:#555}}
.track{{flex:1;max-width:640px;height:16px;background:#f1f1f1;border-radius:3px;overflow:hidden}}
.bar{{display:block;height:16px}}
.value{{width:110px;padding-left:8px;font-size:12px}} .conv{{color:#888}}
.key{{margin-right:14px;font-size:12px}}
.key i{{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}}
</style></head><body>
<h1>clinicsync · {escape(clinic_id)}</h1>
<div class=muted>generated {now:%Y-%m-%d %H:%M} UTC ·
funnel {funnel.since:%d.%m.%Y}–{funnel.until:%d.%m.%Y} ({(funnel.until - funnel.since).days} days)</div>
<div class=tiles>
<div class=tile>messages synced<b>{messages}</b></div>
<div class=tile>average sync lag<b>{lag:.1f} s</b></div>
<div class=tile>errors<b>{errors}</b></div>
<div class=tile>CRM requests / throttled<b>{requests} / {throttles}</b></div>
</div>
<h2>Sync health over time</h2>
<div class=muted>bars: messages synced per 6 hours · line: average lag from poll to CRM · marks on top: errors</div>
{_health_svg(health, since, funnel.until)}
<h2>Funnel: lead → booked → visited → won</h2>
<div class=muted>by lead source · DMS (insurance) visits excluded: {funnel.dms_excluded} ·
percentages of each source's leads</div>
<div>{legend}</div>
{_funnel_row(total, scale, strong=True)}
{rows}
</body></html>
"""
