"""The attribution page: one self-contained HTML file (no network) for one answer or a batch.

It is drawn from the answers' JSON (`Attribution.to_dict`, strict: NaN as null), so a saved
`attribution.json` or `attributions.jsonl` holds everything the page shows. Per answer: each
content token linked to its source sentence (hovering highlights it), tokens copied from the
question and unsupported tokens marked, the documents shaded by how many answer tokens point to
each sentence, and the per-token table. Every user text is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:1000px;
padding:1.5em;color:#222;line-height:1.5}
.meta{color:#666;font-size:.9em} .answer{font-size:1.25em;background:#f7f7f7;padding:.6em .8em;border-radius:4px}
a.tok{color:inherit;text-decoration:none;border-bottom:2px solid #4a90d9;padding:0 1px}
span.tok{padding:0 1px} .unsupported{background:#ffd6d6;border-bottom:2px dashed #c00 !important}
.question{background:#e8e2f8;border-bottom:2px dotted #6a4fb3 !important}
.sent{border-radius:3px} .sent.active{outline:2px solid #4a90d9;background:#cfe3ff !important}
.passage{border:1px solid #ddd;padding:.6em .9em;margin:.8em 0;white-space:pre-wrap}
.passage h3{margin:.1em 0 .4em;font-size:1em;white-space:normal}
table.data{border-collapse:collapse;font-size:.85em}
table.data td,table.data th{border:1px solid #ddd;padding:.2em .5em}
.legend span{margin-right:1.2em} section.item{border-top:2px solid #ccc;margin-top:2em}
"""

_JS = """
document.querySelectorAll('a.tok').forEach(function(a){
  var s=document.getElementById(a.getAttribute('href').slice(1));
  if(!s){return;}
  a.addEventListener('mouseenter',function(){s.classList.add('active');});
  a.addEventListener('mouseleave',function(){s.classList.remove('active');});
  a.addEventListener('focus',function(){s.classList.add('active');});
  a.addEventListener('blur',function(){s.classList.remove('active');});
});
"""

STATE_CLASS = {"unsupported": "tok unsupported", "question": "tok question"}
STATE_LABEL = {"unsupported": "unsupported", "question": "from the question"}


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return _fmt(None if x is None else 100 * x, 0)


def _answer(d: dict[str, Any], ids: str, answer_id: str) -> str:
    """The body of one answer; `ids` prefixes its sentence ids (unique on a page of several)."""
    e = html.escape
    ps = d["prompt"]
    votes = {s["sentence"]: s["tokens"] for s in d["sources"]}
    top = max(votes.values(), default=1)
    toks = []
    for t in d["tokens"]:
        heads = ", ".join(t["copying_heads"]) or "no head"
        title = (
            f"copy {_fmt(t['copy'])} ({heads}), context mass {_fmt(t['context_mass'])}, log-prob {_fmt(t['logprob'])}"
        )
        if t["state"] == "question":
            title += f"; copied from the question by {_fmt(t['question_copy'])} of the heads"
        cls = STATE_CLASS.get(t["state"], "tok")
        if t["sentence"] is not None and t["content"]:
            toks.append(f'<a class="{cls}" href="#{ids}{t["sentence"]}" title="{e(title)}">{e(t["text"])}</a>')
        else:
            toks.append(f'<span class="{cls}" title="{e(title)}">{e(t["text"])}</span>')
    passages = []
    by_passage: dict[int, list[int]] = {}
    for i, s in enumerate(ps["sentences"]):
        by_passage.setdefault(s["passage"], []).append(i)
    for p, name in enumerate(ps["passage_names"]):
        sents = []
        for i in by_passage.get(p, []):
            alpha = 0.15 + 0.55 * votes[i] / top if i in votes else 0.0
            style = f' style="background:rgba(255,200,0,{alpha:.2f})"' if alpha else ""
            sents.append(f'<span class="sent" id="{ids}{i}"{style}>{e(ps["sentences"][i]["text"])}</span>')
        passages.append(f'<div class="passage"><h3>{e(name)}</h3>{" ".join(sents)}</div>')
    rows = "".join(
        f"<tr><td>{t['index']}</td><td>{e(repr(t['text']))}</td><td>{_fmt(t['copy'])}</td>"
        f"<td>{_fmt(t['context_mass'])}</td><td>{_fmt(t['logprob'])}</td><td>{STATE_LABEL.get(t['state'], '')}</td>"
        f"<td>{'' if t['sentence'] is None else t['sentence']}</td></tr>"
        for t in d["tokens"]
    )
    sc = d["scores"]
    heads = ", ".join(d["heads"])
    how = "given, traced" if d.get("answer_given") else "generated"
    return f"""<p class="meta">model {e(d["model"])}; watched heads ({len(d["heads"])}, from
{e(d["heads_source"] or "given")}): {e(heads)}; engine {e(d["engine"])}; answer {how}</p>
<p><b>Question:</b> {e(d["question"])}</p>
<p class="answer" id="{answer_id}">{"".join(toks)}</p>
<p><b>Support {_fmt(sc.get("copy"))}</b> (share of watched heads copying each content token from the
context, averaged); unsupported content tokens {_pct(sc.get("unsupported"))} %;
from the question {_pct(sc.get("from_question"))} %;
context mass {_fmt(sc.get("context_mass"))}; mean log-prob {_fmt(sc.get("logprob"))}.</p>
<p class="legend"><span><a class="tok" href="#{answer_id}">token</a> linked to its source sentence (hover)</span>
<span><span class="tok question">token</span> copied from the question</span>
<span><span class="tok unsupported">token</span> no watched head copies it</span></p>
<h3>Context</h3>
{"".join(passages)}
<h3>Tokens</h3>
<table class="data"><tr><th>#</th><th>token</th><th>copy</th><th>context mass</th><th>log-prob</th><th></th>
<th>sentence</th></tr>{rows}</table>"""


def render_html(answers: Sequence[dict[str, Any]]) -> str:
    """The page of one answer, or of several (a table of the answers, then one section each)."""
    e = html.escape
    if len(answers) == 1:
        body = "<h1>Where the answer came from</h1>\n" + _answer(answers[0], "s", "answer")
    else:
        rows = "".join(
            f'<tr><td><a href="#q{j}">{j + 1}</a></td><td>{e(d["question"])}</td><td>{e(d["answer"])}</td>'
            f"<td>{_fmt(d['scores'].get('copy'))}</td><td>{_pct(d['scores'].get('unsupported'))} %"
            "</td></tr>"
            for j, d in enumerate(answers)
        )
        sections = "".join(
            f'<section class="item" id="q{j}"><h2>{j + 1}. {e(d["question"])}</h2>\n'
            f"{_answer(d, f'q{j}-s', f'answer-{j}')}</section>\n"
            for j, d in enumerate(answers)
        )
        body = (
            f'<h1>Where the answers came from</h1>\n<p>{len(answers)} questions</p>\n<table class="data">'
            f"<tr><th>#</th><th>question</th><th>answer</th><th>support</th><th>unsupported</th></tr>{rows}</table>\n"
            + sections
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Attribution</title>'
        f"<style>{_CSS}</style></head>\n<body>\n{body}\n<script>{_JS}</script>\n</body></html>\n"
    )
