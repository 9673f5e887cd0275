"""``forge-batch report OUT``: one self-contained HTML page about a run, for the morning after.

The page needs nothing but itself: charts are SVG drawn by matplotlib (the Agg/SVG backends, no display,
no network) and embedded as ``data:`` images, styles are inline, and there is no script. matplotlib because
it is the long-maintained standard, renders offline with its own bundled fonts and writes plain SVG that any
browser shows. The numbers come from :mod:`forge_batch.io.output_stats`, which reads every output format in
bounded memory.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from forge_batch.io.base import hidden_from_readers
from forge_batch.io.meta import tool_version
from forge_batch.io.output_dir import find_state_dir
from forge_batch.io.output_stats import Distribution, OutputStats, collect_output_stats
from forge_batch.io.safe_fs import atomic_write_bytes

REPORT_FILE = "report.html"
SECTIONS: tuple[tuple[str, str], ...] = (
    ("overview", "Overview"),
    ("throughput", "Throughput over time"),
    ("latency", "TTFT and latency"),
    ("last-run", "Last run: latency and engine"),
    ("lengths", "Prompt and completion lengths"),
    ("finish-reasons", "Finish reasons"),
    ("errors", "Errors"),
    ("validity", "Structured-output validity"),
    ("samples", "Samples (n)"),
    ("job", "Job"),
    ("engine", "Engine"),
    ("history", "Resume history"),
)
MAX_PART_LINES = 200
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1100px;
padding:16px 24px;color:#1b1f24;background:#fff}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:1.6em}
nav a{margin-right:12px;font-size:.9em}table{border-collapse:collapse;margin:8px 0;font-size:.9em}
td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f6f8fa}
td.n{text-align:right;font-variant-numeric:tabular-nums}figure{margin:8px 0}img{max-width:100%;height:auto}
pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:.85em;max-height:480px}.muted{color:#57606a}
.bad{color:#b42318;font-weight:600}.good{color:#1a7f37;font-weight:600}code{font-size:.9em}
"""


# ---- formatting -------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return _e(value)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).isoformat(timespec="seconds")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr>"]
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            cls = ' class="n"' if i in numeric else ""
            out.append(f"<td{cls}>{cell}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _kv(rows: Iterable[tuple[str, Any]]) -> str:
    return _table(("", ""), ((f"<b>{_e(k)}</b>", v) for k, v in rows))


# ---- charts -----------------------------------------------------------------------------------------------


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.grid(True, color="#e5e7eb", linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, axes


def _svg(fig: Any, alt: str) -> str:
    """The figure as an SVG ``data:`` image: self-contained, and each chart's ids stay its own."""
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<figure><img alt="{_e(alt)}" src="data:image/svg+xml;base64,{data}"></figure>'


def _histogram(ax: Any, dist: Distribution, title: str, unit: str, color: str) -> None:
    import numpy as np

    values = dist.values
    integer = values.dtype.kind in "iu"
    if integer:
        span = int(dist.maximum - dist.minimum) + 1
        bins: Any = np.arange(dist.minimum, dist.maximum + 2) - 0.5 if span <= 60 else 50
    else:
        bins = 50
    ax.hist(values, bins=bins, color=color, alpha=0.85)
    if integer:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for q, style in ((dist.p50, "-"), (dist.p90, "--"), (dist.p99, ":")):
        ax.axvline(q, color="#111827", linestyle=style, linewidth=1)
    label = f"p50 {_num(dist.p50)}  p90 {_num(dist.p90)}  p99 {_num(dist.p99)} {unit}".strip()
    ax.set_title(f"{title}\n{label}", fontsize=10)
    ax.set_xlabel(unit)
    ax.set_ylabel("count")


def _barh(ax: Any, counts: dict[str, int], title: str, color: str) -> None:
    items = sorted(counts.items(), key=lambda kv: kv[1])
    labels = [k for k, _ in items]
    ax.barh(range(len(items)), [v for _, v in items], color=color)
    ax.set_yticks(range(len(items)), labels)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("count")


# ---- sections ---------------------------------------------------------------------------------------------


def _overview(s: OutputStats) -> str:
    summary = s.summary or {}
    status_class = "good" if s.status == "completed" else "bad"
    rows: list[tuple[str, Any]] = [
        ("status", f'<span class="{status_class}">{_e(s.status)}</span>'),
        ("output", f"<code>{_e(s.path)}</code> ({_e(s.output_format)})"),
        ("rows", _num(s.rows)),
        ("samples (output records)", _num(s.records)),
        ("samples with an error", f"{_num(s.failed_records)} ({_pct(s.failed_records, s.records)})"),
        ("prompt tokens", _num(s.prompt_tokens)),
        ("completion tokens", _num(s.completion_tokens)),
        ("parts / runs", f"{len(s.parts)} / {len(s.runs)}"),
    ]
    if summary.get("message"):
        rows.append(("summary.json message", _e(summary["message"])))
    tp = summary.get("throughput") or {}
    if tp:
        rows.append(
            ("last run (summary.json)",
             f"{_num(tp.get('rows_per_s'))} rows/s, {_num(tp.get('output_tokens_per_s'))} output tok/s, "
             f"wall time {_num(summary.get('wall_time_s'))} s")
        )
    if summary.get("started_at"):
        rows.append(("last run started / finished", f"{_e(summary.get('started_at'))} / {_e(summary.get('finished_at'))}"))
    out = _kv(rows)
    for note in s.notes:
        out += f'<p class="muted">{_e(note)}</p>'
    return out


def _throughput(s: OutputStats) -> str:
    import numpy as np

    if not s.throughput:
        return '<p class="muted">Not enough finished rows with times to plot throughput.</p>'
    fig, axes = _figure(10, 5, nrows=2)
    ax_rows, ax_tok = axes[0][0], axes[1][0]
    longest = max(len(series.rows_per_s) * series.bin_s for series in s.throughput)
    unit, scale = ("seconds", 1.0) if longest < 180 else ("minutes", 60.0) if longest < 3 * 3600 else ("hours", 3600.0)
    for k, series in enumerate(s.throughput):
        color = COLORS[k % len(COLORS)]
        edges = np.arange(len(series.rows_per_s) + 1) * series.bin_s / scale
        label = f"run {series.run} ({_when(series.start)})"
        ax_rows.stairs(series.rows_per_s, edges, color=color, label=label, linewidth=1.5)
        if not np.all(np.isnan(series.tokens_per_s)):
            ax_tok.stairs(series.tokens_per_s, edges, color=color, label=label, linewidth=1.5)
    ax_rows.set_ylabel("rows/s")
    ax_tok.set_ylabel("output tok/s")
    ax_tok.set_xlabel(f"{unit} since the run's first finished row")
    ax_rows.set_title("Throughput over time", fontsize=10)
    ax_rows.legend(fontsize=8, loc="best")
    rows = []
    for series in s.throughput:
        run = next(r for r in s.runs if r.number == series.run)
        first, last = run.first_finished, run.last_finished
        span = (last - first) if first is not None and last is not None else None
        rate = (run.rows / span) if span else None
        rows.append((series.run, _e(_when(first)), _num(span), _num(run.rows), _num(rate), _e(series.source)))
    note = (
        '<p class="muted">Rows and output tokens per second in bins of equal width from each run\'s first '
        "finished row to its last (engine loading before the first row is not shown).</p>"
    )
    table = _table(("run", "first row finished", "seconds", "rows", "rows/s", "from"), rows, numeric=(0, 2, 3, 4))
    return _svg(fig, "throughput over time") + note + table


def _dist_rows(items: Sequence[tuple[str, Distribution | None, str]]) -> str:
    rows = []
    for name, d, unit in items:
        if d is None:
            rows.append((name, "-", "-", "-", "-", "-", "-", unit))
        else:
            rows.append((name, _num(d.count), _num(d.mean), _num(d.p50), _num(d.p90), _num(d.p99), _num(d.maximum), unit))
    return _table(("", "count", "mean", "p50", "p90", "p99", "max", "unit"), rows, numeric=(1, 2, 3, 4, 5, 6))


def _two_histograms(a: tuple[str, Distribution | None, str], b: tuple[str, Distribution | None, str], alt: str) -> str:
    present = [x for x in (a, b) if x[1] is not None]
    if not present:
        return '<p class="muted">No values in this output.</p>'
    fig, axes = _figure(10, 3.4, ncols=len(present))
    for k, (title, dist, unit) in enumerate(present):
        assert dist is not None
        _histogram(axes[0][k], dist, title, unit, COLORS[k])
    return _svg(fig, alt) + _dist_rows([a, b])


def _latency(s: OutputStats) -> str:
    note = '<p class="muted">One value per row without an error (a row\'s samples share its timing).</p>'
    return _two_histograms(("TTFT", s.ttft_s, "s"), ("Latency", s.latency_s, "s"), "TTFT and latency histograms") + note


def _last_run(s: OutputStats) -> str:
    """The last run's figures from summary.json: TTFT / inter-token / latency quantiles, the engine's KV
    peak, preemptions and prefix-cache hits, and its tokens per second over time."""
    summary = s.summary or {}
    latency = summary.get("latency")
    if not latency:
        return '<p class="muted">No figures: <code>summary.json</code> is missing (a run in progress) or older.</p>'
    rows = []
    for key, name in (("ttft_s", "TTFT"), ("itl_s", "inter-token latency"), ("latency_s", "latency")):
        d = latency.get(key) or {}
        rows.append((name, _num(d.get("count")), _num(d.get("mean")), _num(d.get("p50")), _num(d.get("p90")),
                     _num(d.get("p99")), _num(d.get("max")), "s"))
    out = _table(("", "count", "mean", "p50", "p90", "p99", "max", "unit"), rows, numeric=(1, 2, 3, 4, 5, 6))
    kv, prefix = summary.get("kv_cache") or {}, summary.get("prefix_cache") or {}
    facts = [
        ("KV cache peak", f"{_num(kv.get('peak_blocks'))} of {_num(kv.get('blocks_total'))} blocks "
                          f"({_num(100 * kv['peak_ratio'] if kv.get('peak_ratio') is not None else None)}%)"),
        ("preemptions", _num(summary.get("preemptions"))),
        ("prefix cache", f"{_num(prefix.get('hits'))} hits of {_num(prefix.get('queries'))} block lookups "
                         f"({_num(100 * prefix['hit_rate'] if prefix.get('hit_rate') is not None else None)}%)"),
    ]
    out += _kv(facts)
    series = summary.get("throughput_over_time") or {}
    tok = series.get("output_tokens_per_s") or []
    if len(tok) >= 2:
        step = float(series.get("interval_s") or 1.0)
        fig, axes = _figure(10, 2.6)
        ax = axes[0][0]
        ax.step([i * step for i in range(len(tok))], tok, where="post", color=COLORS[2])
        ax.set_xlabel("seconds since generation started")
        ax.set_ylabel("output tok/s")
        ax.set_title(f"Output tokens per second ({_num(step)} s buckets)", fontsize=10)
        out += _svg(fig, "last run's output tokens per second over time")
    return out + (
        '<p class="muted">From <code>summary.json</code>: the last run only (a resumed job\'s earlier runs kept '
        "no timings). Quantiles from a log-bucket histogram: within 1%.</p>"
    )


def _lengths(s: OutputStats) -> str:
    note = '<p class="muted">Prompt tokens per row; completion tokens per sample; rows and samples with an error left out.</p>'
    return _two_histograms(
        ("Prompt length", s.prompt_len, "tokens"), ("Completion length", s.completion_len, "tokens"), "length histograms"
    ) + note


def _counts_section(counts: dict[str, int], total: int, title: str, color: str, table: bool = True) -> str:
    if not counts:
        return '<p class="muted">None.</p>'
    fig, axes = _figure(8, 0.6 + 0.35 * max(2, len(counts)))
    _barh(axes[0][0], counts, title, color)
    if not table:
        return _svg(fig, title)
    rows = [(_e(k), _num(v), _pct(v, total)) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    return _svg(fig, title) + _table(("value", "samples", "share"), rows, numeric=(1, 2))


def _finish_reasons(s: OutputStats) -> str:
    return _counts_section(dict(s.finish_reasons), s.records, "Finish reasons", COLORS[0])


def _errors(s: OutputStats) -> str:
    if not s.error_kinds:
        return '<p class="good">No sample has an error.</p>'
    chart = _counts_section(dict(s.error_kinds), s.records, "Error kinds (samples)", COLORS[3], table=False)
    rows = []
    for kind, count in sorted(s.error_kinds.items(), key=lambda kv: -kv[1]):
        examples = "".join(
            f"<div><code>{_e(ex.get('id'))}</code> (row {_e(ex.get('row_index'))}, sample {_e(ex.get('sample_index'))}): "
            f"{_e(str(ex.get('error'))[:300])}</div>"
            for ex in s.error_examples.get(kind, [])
        )
        rows.append((f"<code>{_e(kind)}</code>", _num(count), _pct(count, s.records), examples))
    note = '<p class="muted"><code>skipped</code> rows were left out on purpose by a plugin and are not failures.</p>'
    header = ("error_kind", "samples", "share", "examples (id, row, sample: error)")
    return chart + _table(header, rows, numeric=(1, 2)) + note


def _validity(s: OutputStats) -> str:
    true, false, null = s.valid.get("True", 0), s.valid.get("False", 0), s.valid.get("null", 0)
    if not s.valid:
        return '<p class="muted">This output format has no <code>valid</code> column.</p>'
    if true + false == 0:
        return f'<p class="muted">No constrained samples ({_num(null)} samples have <code>valid</code> null).</p>'
    counts = {"valid": true, "invalid": false, "not constrained": null}
    fig, axes = _figure(8, 1.6)
    _barh(axes[0][0], {k: v for k, v in counts.items() if v}, "valid column", COLORS[2])
    rate = true / (true + false)
    return _svg(fig, "structured-output validity") + _kv(
        [("valid", _num(true)), ("invalid", _num(false)), ("not constrained (null)", _num(null)),
         ("valid rate of constrained samples", f"{100 * rate:.2f}%")]
    )


def _samples(s: OutputStats) -> str:
    rows = [
        (
            _num(p["sample_index"]), _num(p["records"]), _num(p["errors"]), _num(p["mean_completion_tokens"]),
            _pct(p["length_finishes"], p["records"]),
            "-" if p["valid_rate"] is None else f"{100 * p['valid_rate']:.1f}%",
        )
        for p in s.per_sample
    ]
    table = _table(
        ("sample_index", "samples", "errors", "mean completion tokens", "finish length", "valid rate"), rows,
        numeric=(0, 1, 2, 3, 4, 5),
    )
    per_row = _table(
        ("samples written per row", "rows"), ((_num(k), _num(v)) for k, v in sorted(s.samples_per_row.items())), numeric=(0, 1)
    )
    chart = ""
    if len(s.per_sample) > 1:
        fig, axes = _figure(8, 2.6)
        ax = axes[0][0]
        xs = [p["sample_index"] for p in s.per_sample]
        ax.bar(xs, [p["mean_completion_tokens"] or 0 for p in s.per_sample], color=COLORS[4])
        if len(xs) <= 32:
            ax.set_xticks(xs)
        ax.set_xlabel("sample_index")
        ax.set_ylabel("mean completion tokens")
        ax.set_title("Completion length by sample", fontsize=10)
        chart = _svg(fig, "completion length by sample index")
    sampling = ((s.job or {}).get("sampling") or {})
    n = f"<p>Job <code>sampling.n</code>: {_e(sampling.get('n', '-'))}</p>" if sampling else ""
    return n + chart + table + per_row


def _job(s: OutputStats) -> str:
    if not s.job:
        return '<p class="muted">No job spec found (no manifest and no Parquet metadata).</p>'
    return f"<pre>{_e(json.dumps(s.job, indent=2, sort_keys=True))}</pre>"


def _engine(s: OutputStats) -> str:
    if not s.engine:
        return '<p class="muted">The engine recorded no resolved identity (an engine without <code>engine_info</code>).</p>'
    out = _kv((k, f"<code>{_e(v if isinstance(v, str) else json.dumps(v))}</code>") for k, v in s.engine.items())
    engines = {p.engine for p in s.parts if p.engine}
    if len(engines) > 1:
        rows = []
        for run in s.runs:
            seen = sorted({p.engine for p in run.parts if p.engine})
            rows.append((run.number, "<br>".join(f"<code>{_e(e)}</code>" for e in seen)))
        out += "<p class=\"bad\">The parts were written by different engines:</p>" + _table(("run", "engine"), rows)
    return out


def _history(s: OutputStats) -> str:
    if not s.runs:
        return '<p class="muted">No committed parts yet.</p>'
    logged = all(run.started_by == "runs.jsonl" for run in s.runs)

    def ended(run: Any) -> str:
        if not logged:
            return "-"
        return _e(run.ended) if run.ended else '<span class="bad">no end line: killed, or still running</span>'

    rows = [
        (
            run.number, _e(run.started_at or "-") if logged else _e(run.started_by), ended(run),
            (f"{_e(run.parts[0].file)} .. {_e(run.parts[-1].file)}" if run.parts else "-"), _num(len(run.parts)),
            _num(run.rows), _num(run.records), _num(run.failed_records), _e(_when(run.first_finished)),
            _e(_when(run.last_finished)),
        )
        for run in s.runs
    ]
    header = ("run", "started" if logged else "told apart by", "ended", "part files", "parts", "rows", "samples",
              "with error", "first row finished", "last row finished")
    out = _table(header, rows, numeric=(0, 4, 5, 6, 7))
    if logged:
        out += '<p class="muted">From <code>runs.jsonl</code> in the state folder (a line per run start and end).</p>'
    else:
        out += (
            '<p class="muted">No run log (<code>runs.jsonl</code> in the state folder): runs are inferred. A run starts at the '
            "first part, where <code>summary.json</code>'s <code>started_at</code> or a <code>--force-resume</code> "
            "falls, where the parts' engine changes, or after a gap with no finished row.</p>"
        )
    if s.forced_resumes:
        out += "<h3>Forced resumes</h3>" + _table(
            ("at", "kind", "changes"),
            ((_e(f.get("at")), _e(f.get("kind")), "<br>".join(_e(c) for c in f.get("changes") or [])) for f in s.forced_resumes),
        )
    parts = s.parts[:MAX_PART_LINES]
    out += "<h3>Parts</h3>" + _table(
        ("file", "committed_at", "samples", "rows", "with error"),
        ((_e(p.file), _e(p.committed_at or "-"), _num(p.records), _num(p.rows), _num(p.failed_records)) for p in parts),
        numeric=(2, 3, 4),
    )
    if len(s.parts) > len(parts):
        out += f'<p class="muted">... and {len(s.parts) - len(parts)} more parts.</p>'
    return out


_RENDER = {
    "overview": _overview,
    "throughput": _throughput,
    "latency": _latency,
    "last-run": _last_run,
    "lengths": _lengths,
    "finish-reasons": _finish_reasons,
    "errors": _errors,
    "validity": _validity,
    "samples": _samples,
    "job": _job,
    "engine": _engine,
    "history": _history,
}


def render_report(stats: OutputStats) -> str:
    """The whole HTML page for ``stats``."""
    name = (stats.job or {}).get("name") or stats.path.name
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    body = [
        f"<h1>forge-batch report: {_e(name)}</h1>",
        f'<p class="muted">{_e(stats.path)} - generated {_e(now)} by forge-batch {_e(tool_version())}</p>',
        "<nav>" + "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS) + "</nav>",
    ]
    for sid, title in SECTIONS:
        body.append(f'<section id="{sid}"><h2>{_e(title)}</h2>{_RENDER[sid](stats)}</section>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>forge-batch report: {_e(name)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def default_report_path(output: str | Path) -> Path:
    return find_state_dir(output) / REPORT_FILE


def _refuse_inside_the_rows(output: Path, page: Path) -> None:
    """A page among an output folder's parts would be read as data by every reader of the folder (they skip
    only names starting with '.' or '_'): ValueError."""
    try:
        rel = page.resolve().relative_to(output.resolve())
    except (OSError, ValueError):
        return
    if output.is_dir() and not any(hidden_from_readers(part) for part in rel.parts):
        raise ValueError(f"{page} is inside the output folder {output}: readers of the folder would take it for data; "
                         "write it elsewhere (the default is the output's state folder)")


def write_report(output: str | Path, html_path: str | Path | None = None) -> Path:
    """Scan ``output`` and write its report (default ``report.html`` in the output's state folder, ``.NAME.forge_batch`` next to it) atomically; returns
    the path. Raises FileNotFoundError when ``output`` is not a directory."""
    stats = collect_output_stats(output)
    path = Path(html_path) if html_path is not None else default_report_path(output)
    _refuse_inside_the_rows(Path(output), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, render_report(stats).encode("utf-8"))
    return path
