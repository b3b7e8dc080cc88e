"""A/B comparison by people: one self-contained HTML page with each prompt and the two continuations side by
side, and the tally of the preferences people click on it.

``render_ab`` turns a ``lowbit generate`` result into the page (inline CSS and script, no external reference,
so it can be mailed or opened from disk) and a key file beside it. In blind mode (the default) the sides are
shuffled per prompt with a seeded RNG and which model wrote side A or B is only in the key, never in the page;
labelled mode puts the original on side A and says so. In both, the first token where the two continuations
differ is marked (``<mark>``). A person clicks A, tie or B per prompt; the page keeps the votes in a visible
text box (and in the browser's local storage, so a reload keeps them) and "Save votes" downloads them as
votes.json. ``tally`` maps the votes back through the key and tests the quantized model's preference rate
against 1/2 with a two-sided exact binomial test; ties carry no preference and are left out of the test.

Page, key and votes carry the same page id (a hash of the generation result, the seed and the mode), so votes
are never tallied with another page's key.
"""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.io_utils import atomic_file

GENERATION_FORMAT = "lowbit-generation"
KEY_FORMAT, VOTES_FORMAT, FORMAT_VERSION = "lowbit-ab-key", "lowbit-ab-votes", 1
CHOICES = ("A", "tie", "B")
MODELS = ("original", "quantized")
TEST = ("two-sided exact binomial test of H0: the quantized and the original continuation are preferred equally "
        "often (p = 1/2), on the A/B votes; ties are excluded")

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } p.meta { margin: 0.3em 0; color: #444; }
section.item { border-top: 1px solid #ccc; padding: 0.6em 0 1em; }
section.item h2 { font-size: 1.05em; margin: 0.4em 0; } span.source { color: #777; font-weight: normal; }
pre { white-space: pre-wrap; word-wrap: break-word; font-family: ui-monospace, monospace; font-size: 0.92em;
      margin: 0; padding: 0.5em 0.7em; border-radius: 4px; }
pre.prompt { background: #f3f3f3; } div.pair { display: flex; gap: 1em; margin: 0.6em 0; }
div.side { flex: 1 1 0; min-width: 0; border: 1px solid #ddd; border-radius: 4px; }
div.side h3 { margin: 0; padding: 0.3em 0.7em; background: #f0f4fa; font-size: 0.95em; }
mark { background: #ffd54f; } mark.end { background: #ffcdd2; font-style: italic; }
p.diff { color: #555; font-size: 0.9em; margin: 0.2em 0; }
div.vote button { font-size: 1em; padding: 0.3em 1.1em; margin-right: 0.5em; cursor: pointer; border: 1px solid #999;
                  border-radius: 4px; background: #fff; }
div.vote button.chosen { background: #1f77b4; color: #fff; border-color: #1f77b4; }
#votes-box { background: #fafafa; border-top: 2px solid #1f77b4; padding: 0.6em 0; margin-top: 1em; }
#votes { width: 100%; height: 7em; font-family: ui-monospace, monospace; font-size: 0.85em; }
"""

SCRIPT = """
(function () {
  const PAGE_ID = %(page_id)s, IDS = %(ids)s, CHOICES = ["A", "tie", "B"];
  const STORE = "lowbit-ab-" + PAGE_ID, votes = {};
  function show(store) {
    document.querySelectorAll("button.vote").forEach(function (b) {
      b.classList.toggle("chosen", votes[b.dataset.id] === b.dataset.choice);
      b.setAttribute("aria-pressed", votes[b.dataset.id] === b.dataset.choice ? "true" : "false");
    });
    const ordered = {};
    IDS.forEach(function (id) { if (id in votes) ordered[id] = votes[id]; });
    const doc = {format: %(format)s, format_version: %(version)s, page_id: PAGE_ID, prompts: IDS.length,
                 votes: ordered};
    document.getElementById("votes").value = JSON.stringify(doc, null, 1);
    document.getElementById("progress").textContent =
      Object.keys(ordered).length + " of " + IDS.length + " prompts voted";
    if (store) {  // not on load: a reload that reads storage before the last write landed must not erase it
      try { localStorage.setItem(STORE, JSON.stringify(ordered)); } catch (e) { /* file:// without storage */ }
    }
  }
  document.querySelectorAll("button.vote").forEach(function (b) {
    b.addEventListener("click", function () {
      if (votes[b.dataset.id] === b.dataset.choice) { delete votes[b.dataset.id]; }  // a second click clears
      else { votes[b.dataset.id] = b.dataset.choice; }
      show(true);
    });
  });
  document.getElementById("save").addEventListener("click", function () {
    const blob = new Blob([document.getElementById("votes").value + "\\n"], {type: "application/json"});
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "votes.json";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(a.href); }, 10000);
  });
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    IDS.forEach(function (id) { if (CHOICES.indexOf(saved[id]) >= 0) votes[id] = saved[id]; });
  } catch (e) { /* nothing saved */ }
  show(false);
})();
"""


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a missing or malformed file is a one-line error naming ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LowbitError(f"{path} is not valid JSON; give the {what}") from None
    if not isinstance(data, dict):
        raise LowbitError(f"{path} is not a JSON object; give the {what}")
    return data


def check_generation(result: dict[str, Any], path: str | Path) -> None:
    """The fields the page needs, so a wrong file is one line, not a KeyError."""
    items = result.get("items")
    if result.get("format") != GENERATION_FORMAT or not isinstance(items, list):
        raise LowbitError(f"{path} is not a lowbit generation result; make one with 'lowbit generate'")
    if not items:
        raise LowbitError(f"{path} has no prompts to compare")
    for item in items:
        if not all(isinstance(item.get(m), dict) and isinstance(item[m].get("text"), str) for m in MODELS):
            raise LowbitError(f"{path}: prompt {item.get('id')} lacks the original's or the quantized text")


def assign_sides(n: int, blind: bool, seed: int) -> list[dict[str, str]]:
    """Per prompt, which model is on side A and on side B: shuffled by a seeded RNG when ``blind``, else the
    original always on A."""
    flips = np.random.default_rng(seed).integers(0, 2, n) if blind else np.zeros(n, dtype=int)
    return [{"A": MODELS[int(f)], "B": MODELS[1 - int(f)]} for f in flips]


def page_id(result: dict[str, Any], blind: bool, seed: int) -> str:
    """16 hex digits of the SHA-256 of the items, mode and seed: what ties page, key and votes together."""
    content = json.dumps({"items": result["items"], "blind": blind, "seed": seed}, sort_keys=True)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _continuation(side: dict[str, Any]) -> str:
    """The continuation's text, escaped, with its first differing token in ``<mark>`` (an empty span — this
    side stopped where the other went on — shows as a marked "end")."""
    text, mark = side["text"], side.get("mark")
    if not mark:
        return _esc(text)
    start, end = int(mark[0]), int(mark[1])
    marked = f"<mark>{_esc(text[start:end])}</mark>" if end > start else '<mark class="end">[end]</mark>'
    return f"{_esc(text[:start])}{marked}{_esc(text[end:])}"


def _side_title(letter: str, model: str, result: dict[str, Any], blind: bool) -> str:
    if blind:
        return letter
    if model == "original":
        return f"{letter} · original ({result.get('original')}, {result.get('original_engine')})"
    return f"{letter} · quantized ({result.get('label') or result.get('model')}, {result.get('engine')})"


def _item_html(index: int, item: dict[str, Any], sides: dict[str, str], result: dict[str, Any], blind: bool) -> str:
    item_id = _esc(item["id"])
    columns = "".join(f'<div class="side" data-side="{letter}"><h3>'
                      f'{_esc(_side_title(letter, sides[letter], result, blind))}</h3>'
                      f'<pre class="cont">{_continuation(item[sides[letter]])}</pre></div>' for letter in "AB")
    if item.get("exact"):
        diff = "The two continuations are identical."
    else:
        diff = f"They agree for {int(item.get('divergence', 0))} tokens; the first different token is marked."
    labels = {"A": "A is better", "tie": "Tie", "B": "B is better"}
    buttons = "".join(f'<button type="button" class="vote" data-id="{item_id}" data-choice="{c}">{labels[c]}</button>'
                      for c in CHOICES)
    return (f'<section class="item" id="{item_id}"><h2>Prompt {index + 1} <span class="source">'
            f'{_esc(item.get("source", ""))}</span></h2><pre class="prompt">{_esc(item["prompt"])}</pre>'
            f'<div class="pair">{columns}</div><p class="diff">{diff}</p><div class="vote">{buttons}</div></section>')


def page_html(result: dict[str, Any], sides: list[dict[str, str]], pid: str, blind: bool) -> str:
    """The whole page as one string: every text escaped, the script's data JSON-encoded with ``</`` broken up."""
    items = result["items"]
    if blind:
        title = "Blind A/B: which continuation is better?"
        about = ("Two models continued each prompt (greedy decoding). Which one wrote A and which B changes from "
                 "prompt to prompt and is not in this page.")
    else:
        title = "A/B: original and quantized continuations"
        about = (f"Original: {result.get('original')} ({result.get('original_engine')}); quantized: "
                 f"{result.get('label') or result.get('model')} ({result.get('engine')}); greedy decoding.")
    prompts = result.get("prompts") or {}
    meta = [about, f"{len(items)} prompts, up to {prompts.get('new_tokens', '?')} new tokens each. Click the "
            "continuation you prefer (or tie; a second click clears), then Save votes (at the end of the page) and "
            "send votes.json.",
            f"Page {pid}."]
    values = {"page_id": pid, "ids": [i["id"] for i in items], "format": VOTES_FORMAT, "version": FORMAT_VERSION}
    data = {k: json.dumps(v).replace("</", "<\\/") for k, v in values.items()}
    body = "".join(_item_html(i, item, s, result, blind) for i, (item, s) in enumerate(zip(items, sides)))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>"
            + "".join(f'<p class="meta">{_esc(m)}</p>' for m in meta)
            + f'<main>{body}</main><div id="votes-box"><button type="button" id="save">Save votes</button> '
            '<span id="progress"></span><br><label for="votes">Votes (saved as votes.json):</label>'
            '<textarea id="votes" readonly></textarea></div>'
            f"<script>{SCRIPT % data}</script></body></html>\n")


def default_key_path(page: str | Path) -> Path:
    """The key beside the page: ``ab.html`` -> ``ab.key.json``."""
    page = Path(page)
    return page.with_name(f"{page.stem}.key.json")


def render_ab(result: dict[str, Any], page: str | Path, blind: bool = True, seed: int = 0,
              force: bool = False) -> tuple[Path, Path]:
    """Write the A/B page and its key (``<page stem>.key.json``); returns both paths."""
    page, key_path = Path(page), default_key_path(page)
    sides = assign_sides(len(result["items"]), blind, seed)
    pid = page_id(result, blind, seed)
    key = {"format": KEY_FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": __version__, "page_id": pid,
           "page": page.name, "blind": blind, "seed": seed,
           "models": {"original": f"{result.get('original')} ({result.get('original_engine')})",
                      "quantized": f"{result.get('label') or result.get('model')} ({result.get('engine')})"},
           "sides": {item["id"]: s for item, s in zip(result["items"], sides)}}
    for path in (page, key_path):
        if path.exists() and not force:
            raise LowbitError(f"output {path} already exists; choose another --out or pass --force to replace it")
    with atomic_file(key_path, force=True) as tmp:
        tmp.write_text(json.dumps(key, indent=1) + "\n", encoding="utf-8")
    with atomic_file(page, force=True) as tmp:
        tmp.write_text(page_html(result, sides, pid, blind), encoding="utf-8")
    return page, key_path


def tally(votes: dict[str, Any], key: dict[str, Any], votes_path: str | Path = "votes",
          key_path: str | Path = "key") -> dict[str, Any]:
    """Votes mapped through the key: how often each model was preferred, ties, prompts not voted on, the
    quantized model's preference rate over the non-tie votes with its exact (Clopper-Pearson) 95% interval,
    and the two-sided binomial test's p-value (None when every vote is a tie or there are none)."""
    from scipy.stats import binomtest

    if key.get("format") != KEY_FORMAT or not isinstance(key.get("sides"), dict):
        raise LowbitError(f"{key_path} is not an A/B key; give the .key.json written beside the page")
    if votes.get("format") != VOTES_FORMAT or not isinstance(votes.get("votes"), dict):
        raise LowbitError(f"{votes_path} is not a votes file; give the votes.json the page saves")
    if votes.get("page_id") != key.get("page_id"):
        raise LowbitError(f"{votes_path} holds votes for page {votes.get('page_id')}, but {key_path} is the key of "
                          f"page {key.get('page_id')}; give the key written with that page")
    counts = dict.fromkeys((*MODELS, "tie"), 0)
    for item_id, choice in votes["votes"].items():
        if item_id not in key["sides"]:
            raise LowbitError(f"{votes_path} has a vote for prompt {item_id!r}, which the page does not have")
        if choice not in CHOICES:
            raise LowbitError(f"{votes_path}: the vote for {item_id} is {choice!r}; votes are A, B or tie")
        counts["tie" if choice == "tie" else key["sides"][item_id][choice]] += 1
    q, n = counts["quantized"], counts["quantized"] + counts["original"]
    out = {"page_id": key["page_id"], "blind": key.get("blind"), "models": key.get("models"),
           "prompts": len(key["sides"]), "voted": n + counts["tie"], "not_voted": len(key["sides"]) - n - counts["tie"],
           "quantized_preferred": q, "original_preferred": counts["original"], "ties": counts["tie"],
           "quantized_preference": None, "ci95": None, "p_value": None, "test": TEST}
    if n:
        result = binomtest(q, n, 0.5, alternative="two-sided")
        ci = result.proportion_ci(confidence_level=0.95, method="exact")
        out.update(quantized_preference=q / n, ci95=[float(ci.low), float(ci.high)], p_value=float(result.pvalue))
    return out
