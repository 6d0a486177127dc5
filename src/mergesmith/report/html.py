"""One self-contained HTML file: config, source inventory, analysis (tables and plots), evaluation table.

No external assets: the style is inline and every figure is a base64 PNG data URI, so the file can be mailed,
attached to a model card or opened offline. Every section is optional; the report shows what it was given.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from pathlib import Path
from typing import Any

from mergesmith.report.plots import Plot, analysis_plots, short_names

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
.muted { color: #777; } .rec { background: #eef6ee; border-left: 4px solid #4a4; padding: 0.6em 1em; }
.status-ok { color: #262; font-weight: bold; } .status-degraded { color: #a60; font-weight: bold; }
.status-failed { color: #b22; font-weight: bold; } .best { font-weight: bold; background: #eef6ee; }
"""


def render_report(
    *,
    analysis: dict[str, Any] | None = None,
    eval_result: dict[str, Any] | None = None,
    config: str | Path | None = None,
    title: str = "mergesmith report",
) -> str:
    """The report as an HTML string. `config` is a config file path (or YAML text)."""
    from mergesmith import __version__

    config_text, config_path = _config_text(config, analysis)
    sections = [f"<h1>{_e(title)}</h1>",
                f"<p class='muted'>mergesmith {_e(__version__)} · {_e(_dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}</p>"]  # fmt: skip
    if config_text is not None:
        sections.append("<h2>Config</h2>" + (f"<p class='muted'>{_e(config_path)}</p>" if config_path else "") + f"<pre>{_e(config_text)}</pre>")
    inventory = _inventory(analysis, eval_result, config_path or config_text)
    if inventory:
        sections.append("<h2>Source models</h2>" + _inventory_table(inventory))
    if analysis is not None:
        sections.append(_analysis_section(analysis))
    if eval_result is not None:
        sections.append(_eval_section(eval_result))
    if len(sections) == 2:
        sections.append("<p>Nothing to report: give an analysis, an evaluation or a config.</p>")
    body = "\n".join(sections)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")  # fmt: skip


def write_report(path: str | Path, **kwargs: Any) -> Path:
    out = Path(path)
    out.write_text(render_report(**kwargs), encoding="utf-8")
    return out


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.4g}"
    if isinstance(x, int) and abs(x) >= 10_000:
        return f"{x:,}"
    return str(x)


def _config_text(config: str | Path | None, analysis: dict[str, Any] | None) -> tuple[str | None, str | None]:
    if config is None and analysis is not None and analysis.get("config"):
        config = analysis["config"]
    if config is None:
        return None, None
    path = Path(str(config))
    if "\n" not in str(config) and path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    return str(config), None


def _inventory(analysis: dict[str, Any] | None, eval_result: dict[str, Any] | None, config: str | None) -> list[dict[str, Any]]:
    if analysis is not None:
        return ([analysis["base"]] if analysis.get("base") else []) + list(analysis["models"])
    if config is not None:
        try:
            from mergesmith.analyze.stream import inventory
            from mergesmith.api import prepare

            plan = prepare(config)
            return [inventory(m, "base" if i == plan.base else "source") for i, m in enumerate(plan.models)]
        except Exception as exc:  # the report still renders the rest; say why the inventory is missing
            return [{"name": "(models could not be opened)", "path": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}]
    if eval_result is not None:
        rows = []
        for m in eval_result.get("models", []):
            row = {"name": m.get("name"), "path": m.get("path"), "role": m.get("role")}
            try:
                from mergesmith.analyze.stream import inventory
                from mergesmith.io.source_model import SourceModel

                if m.get("path") and Path(m["path"]).is_dir():
                    row = inventory(SourceModel.open(m["name"], Path(m["path"])), m.get("role") or "")
            except Exception:  # a folder that is gone or unreadable still gets its row
                pass
            rows.append(row)
        return rows
    return []


_INVENTORY_COLUMNS = [("name", "model"), ("role", "role"), ("path", "path"), ("architecture", "architecture"), ("layers", "layers"),
                      ("hidden_size", "hidden"), ("vocab_size", "vocab"), ("dtype", "dtype"), ("parameters", "parameters")]  # fmt: skip


def _inventory_table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th class='l'>{_e(label)}</th>" if key in ("name", "role", "path", "architecture", "dtype") else f"<th>{_e(label)}</th>"
                   for key, label in _INVENTORY_COLUMNS)  # fmt: skip
    body = ""
    for row in rows:
        cells = ""
        for key, _ in _INVENTORY_COLUMNS:
            cls = " class='l'" if key in ("name", "role", "path", "architecture", "dtype") else ""
            cells += f"<td{cls}>{_e(_fmt(row.get(key)))}</td>"
        body += f"<tr>{cells}</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return f"<figure><img alt='{_e(plot.title)}' src='data:image/png;base64,{data}'><figcaption class='muted'>{_e(plot.title)}</figcaption></figure>"


def _analysis_section(a: dict[str, Any]) -> str:
    names = short_names(a)
    o = a["overall"]
    parts = ["<h2>Analysis</h2>"]
    ref = "the base model" if a.get("reference") == "base" else "the models' mean (no base model)"
    parts.append(f"<p>Task vectors against {_e(ref)}; top-k fraction {_e(a.get('top_k'))}; "
                 f"{_e(o['tensors'])} tensors, {_e(_fmt(o['numel']))} entries per model.</p>")  # fmt: skip
    rec = a.get("recommendation")
    if rec:
        params = "".join(f"<li><code>{_e(k)}: {_e(v)}</code></li>" for k, v in rec["parameters"].items())
        per_model = "".join(f"<li>{_e(n)}: <code>{_e(json.dumps(p))}</code></li>" for n, p in zip(names, rec["model_parameters"]) if p)
        reasons = "".join(f"<li>{_e(r)}</li>" for r in rec["rationale"])
        notes = "".join(f"<li>{_e(n)}</li>" for n in rec.get("notes", []))
        parts.append(f"<div class='rec'><p><b>Recommended: <code>{_e(rec['method'])}</code></b> (rule <code>{_e(rec['rule'])}</code>)</p>"
                     + (f"<ul>{params}{per_model}</ul>" if params or per_model else "")
                     + f"<ul>{reasons}</ul>" + (f"<p>Notes:</p><ul>{notes}</ul>" if notes else "") + "</div>")  # fmt: skip
    per_model_rows = [("‖δ‖ (norm)", o["norm"]), ("‖δ‖ / ‖reference‖", o["relative_norm"]), ("mass fraction (90 % of ‖δ‖²)", o["mass_fraction"]),
                      ("effective rank (mean of 2-D)", o["effective_rank"]), ("effective rank / full", o["normalized_effective_rank"]),
                      ("embeddings' share of ‖δ‖²", o["embedding_fraction"]), ("top-k entries kept", o["topk_fraction"])]  # fmt: skip
    table = "<tr><th class='l'>overall</th>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"
    for label, values in per_model_rows:
        table += f"<tr><td class='l'>{_e(label)}</td>" + "".join(f"<td>{_e(_fmt(v, 4))}</td>" for v in values) + "</tr>"
    parts.append(f"<table>{table}</table>")
    if len(names) > 1:
        pair_rows = "<tr><th class='l'>pair</th><th>cosine</th><th>sign conflict</th><th>Jaccard of top-k</th></tr>"
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                pair_rows += (f"<tr><td class='l'>{_e(names[i])} × {_e(names[j])}</td><td>{_e(_fmt(o['cosine'][i][j]))}</td>"
                              f"<td>{_e(_fmt(o['sign_conflict'][i][j]))}</td><td>{_e(_fmt(o['jaccard'][i][j]))}</td></tr>")  # fmt: skip
        parts.append(f"<table>{pair_rows}</table>")
        parts.append(f"<p>All models: {_e(_fmt(o['conflict_rate']))} of entries in two or more top-k masks disagree in sign; "
                     f"interference (conflicts over the union of top-k entries) {_e(_fmt(o['interference']))}; "
                     f"Jaccard expected for independent masks {_e(_fmt(o['jaccard_independent']))}.</p>")  # fmt: skip
    for plot in analysis_plots(a):
        parts.append(_img(plot))
    if a.get("notes"):
        parts.append("<details><summary>Tensor notes</summary><ul>" + "".join(f"<li>{_e(n)}</li>" for n in a["notes"]) + "</ul></details>")
    return "\n".join(parts)


def _eval_section(ev: dict[str, Any]) -> str:
    models = ev.get("models") or []
    texts = list(dict.fromkeys(t for m in models for t in (m.get("perplexity") or {})))
    skills = list(dict.fromkeys(s for m in models for s in (m.get("skills") or {})))
    best_ppl = {t: _best([(m.get("perplexity") or {}).get(t) for m in models], min) for t in texts}
    best_skill = {s: _best([(m.get("skills") or {}).get(s) for m in models], max) for s in skills}
    head = "<tr><th class='l'>model</th><th class='l'>role</th>" + "".join(f"<th>ppl {_e(t)}</th>" for t in texts)
    head += "".join(f"<th>{_e(s)}</th>" for s in skills) + "</tr>"
    body = ""
    for m in models:
        row = f"<td class='l'>{_e(m.get('name'))}</td><td class='l'>{_e(m.get('role'))}</td>"
        for t in texts:
            v = (m.get("perplexity") or {}).get(t)
            row += f"<td{_best_cls(v, best_ppl[t])}>{_e(_fmt(v))}</td>"
        for s in skills:
            v = (m.get("skills") or {}).get(s)
            row += f"<td{_best_cls(v, best_skill[s])}>{_e(_fmt(v, 2))}</td>"
        body += f"<tr>{row}</tr>"
    parts = ["<h2>Evaluation</h2>", f"<table>{head}{body}</table>",
             "<p class='muted'>perplexity: lower is better; skills: higher is better; best in column highlighted.</p>"]  # fmt: skip
    verdict = ev.get("verdict")
    if verdict:
        status = str(verdict.get("status", ""))
        cls = "status-ok" if status == "ok" else ("status-failed" if "fail" in status else "status-degraded")
        parts.append(f"<p>Verdict on <b>{_e(verdict.get('model'))}</b>: <span class='{cls}'>{_e(status)}</span></p>")
        if verdict.get("skills_lost"):
            parts.append("<p>Skills lost: " + ", ".join(_e(s) for s in verdict["skills_lost"]) + "</p>")
        if verdict.get("reasons"):
            parts.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in verdict["reasons"]) + "</ul>")
    return "\n".join(parts)


def _best(values: list[Any], pick) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return pick(finite) if len(finite) > 1 else None


def _best_cls(v: Any, best: float | None) -> str:
    return " class='best'" if best is not None and v == best else ""
