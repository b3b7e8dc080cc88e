"""The A/B page and tally: sides, key and page id; the tally against scipy and by hand; the page as a real
browser shows it — clicked preferences are exactly what the page reports and saves — and the CLI's tally of
those saved votes through the key."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from scipy.stats import binomtest

from lowbit.analysis.ab import assign_sides, page_id, render_ab, tally
from lowbit.cli import main
from lowbit.errors import LowbitError

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TEXTS = [  # (prompt, original, quantized, divergence in tokens, mark spans in characters)
    ("The <b>with</b> statement", " wraps a block & runs it.", " wraps a loop & runs it.", 3, (8, 14), (8, 13)),
    ("Lists are", " mutable sequences.", " mutable sequences.", 4, None, None),
    ("A tuple", " is immutable.", " is immutable. Like a string.", 3, (14, 14), (14, 19)),
    ("Dicts map", " keys to values.", " names to objects.", 0, (0, 5), (0, 6)),
    ("Sets hold", " unique items.", " unique values.", 2, (7, 13), (7, 14)),
    ("Strings are", " sequences of code points.", " sequences of characters.", 2, (13, 18), (13, 24)),
]


def synthetic_result() -> dict:
    """A generation result as ``lowbit generate`` writes it (only what the page reads is real)."""
    items = []
    for i, (prompt, ref, test, k, ref_mark, test_mark) in enumerate(TEXTS):
        items.append({"id": f"p{i}", "source": f"prompts.jsonl:{i + 1}", "prompt": prompt, "prompt_ids": [1, 2, 3],
                      "original": {"text": ref, "ids": [], "mark": list(ref_mark) if ref_mark else None},
                      "quantized": {"text": test, "ids": [], "mark": list(test_mark) if test_mark else None},
                      "divergence": k, "exact": ref == test, "chrf": 0.0, "rouge_l": 0.0})
    return {"format": "lowbit-generation", "format_version": 1, "model": "out/w4", "kind": "lowbit",
            "engine": "transformers", "label": "W4A16 rtn (w4)", "original": "smollm2",
            "original_engine": "transformers",
            "prompts": {"source": "prompts.jsonl", "count": len(items), "new_tokens": 8}, "metrics": {},
            "items": items}


# ---- sides, key, tally -----------------------------------------------------------------------------------------------

def test_blind_sides_are_seeded_and_mixed_labelled_sides_are_fixed():
    a, b = assign_sides(64, True, 0), assign_sides(64, True, 1)
    assert a == assign_sides(64, True, 0) and a != b
    assert all({s["A"], s["B"]} == {"original", "quantized"} for s in a)
    assert 16 < sum(s["A"] == "quantized" for s in a) < 48
    assert assign_sides(5, False, 3) == [{"A": "original", "B": "quantized"}] * 5


def test_page_id_depends_on_content_mode_and_seed():
    r = synthetic_result()
    ids = {page_id(r, True, 0), page_id(r, True, 1), page_id(r, False, 0)}
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    r2 = synthetic_result()
    r2["items"][0]["quantized"]["text"] += "!"
    assert page_id(r2, True, 0) != page_id(r, True, 0)


def key_and_votes(choices: dict[str, str], sides: dict[str, dict[str, str]], pid: str = "abc"):
    key = {"format": "lowbit-ab-key", "format_version": 1, "page_id": pid, "blind": True, "sides": sides}
    votes = {"format": "lowbit-ab-votes", "format_version": 1, "page_id": pid, "votes": choices}
    return key, votes


def test_tally_maps_votes_through_the_key_and_excludes_ties():
    sides = {f"p{i}": ({"A": "quantized", "B": "original"} if i % 2 else {"A": "original", "B": "quantized"})
             for i in range(12)}
    # p1, p3 (A = quantized) voted A, p0 voted B (B = quantized): 3 for quantized; p2 A, p4 A, p5 B, p6 A, p7 B:
    # 5 for the original; p8, p9 tie; p10, p11 not voted
    choices = {"p0": "B", "p1": "A", "p3": "A", "p2": "A", "p4": "A", "p5": "B", "p6": "A", "p7": "B",
               "p8": "tie", "p9": "tie"}
    key, votes = key_and_votes(choices, sides)
    s = tally(votes, key)
    assert (s["quantized_preferred"], s["original_preferred"], s["ties"]) == (3, 5, 2)
    assert (s["prompts"], s["voted"], s["not_voted"]) == (12, 10, 2)
    expected = binomtest(3, 8, 0.5)
    assert s["quantized_preference"] == 3 / 8 and s["p_value"] == pytest.approx(expected.pvalue)
    # by hand: P(X <= 3 or X >= 5) for X ~ Bin(8, 1/2) = 1 - C(8,4)/256
    assert s["p_value"] == pytest.approx(1 - 70 / 256)
    ci = expected.proportion_ci(0.95, method="exact")
    assert s["ci95"] == pytest.approx([ci.low, ci.high]) and "ties are excluded" in s["test"]


def test_tally_with_only_ties_has_no_test():
    key, votes = key_and_votes({"p0": "tie"}, {"p0": {"A": "original", "B": "quantized"}})
    s = tally(votes, key)
    assert s["ties"] == 1 and s["quantized_preference"] is None and s["p_value"] is None


@pytest.mark.parametrize("change, message", [
    (lambda k, v: v.update(page_id="other"), "holds votes for page other, but key is the key of page abc"),
    (lambda k, v: v["votes"].update(p9="A"), "vote for prompt 'p9', which the page does not have"),
    (lambda k, v: v["votes"].update(p0="C"), "the vote for p0 is 'C'; votes are A, B or tie"),
    (lambda k, v: k.update(format="x"), "key is not an A/B key"),
    (lambda k, v: v.pop("votes"), "votes is not a votes file"),
])
def test_tally_refuses_mismatched_or_malformed_input(change, message):
    key, votes = key_and_votes({"p0": "A"}, {"p0": {"A": "original", "B": "quantized"}})
    change(key, votes)
    with pytest.raises(LowbitError, match=re.escape(message)):
        tally(votes, key)


# ---- the page as written ------------------------------------------------------------------------------------------

def test_blind_page_is_self_contained_marks_divergence_and_hides_the_key(tmp_path):
    page, key_path = render_ab(synthetic_result(), tmp_path / "ab.html", blind=True, seed=3)
    assert key_path == tmp_path / "ab.key.json"
    html, key = page.read_text(), json.loads(key_path.read_text())
    assert not re.search(r"https?://|\bsrc=|<link", html, re.I), "the page must not load anything"
    assert "&lt;b&gt;with&lt;/b&gt;" in html and "<b>with</b>" not in html  # texts escaped
    assert "original" not in html.lower() and "quantized" not in html.lower()  # which side is which: not here
    assert key["page_id"] in html and key["blind"] is True and key["seed"] == 3
    assert key["sides"] == {f"p{i}": s for i, s in enumerate(assign_sides(len(TEXTS), True, 3))}
    # first item: the differing token is marked on both sides, in the shuffled order
    section = re.search(r'<section class="item" id="p0">.*?</section>', html, re.S).group(0)
    marks = re.findall(r"<mark>([^<]*)</mark>", section)
    expected = {"original": " block", "quantized": " loop"}
    assert marks == [expected[key["sides"]["p0"]["A"]], expected[key["sides"]["p0"]["B"]]]
    identical = re.search(r'<section class="item" id="p1">.*?</section>', html, re.S).group(0)
    assert "<mark" not in identical and "identical" in identical
    # a side that stopped early shows a marked end
    assert '<mark class="end">[end]</mark>' in re.search(r'id="p2">.*?</section>', html, re.S).group(0)


def test_labelled_page_names_the_sides_and_refuses_to_overwrite(tmp_path):
    page, key_path = render_ab(synthetic_result(), tmp_path / "ab.html", blind=False)
    html = page.read_text()
    assert html.count("A · original (smollm2, transformers)") == len(TEXTS)
    assert html.count("B · quantized (W4A16 rtn (w4), transformers)") == len(TEXTS)
    assert set(map(json.dumps, json.loads(key_path.read_text())["sides"].values())) == {
        json.dumps({"A": "original", "B": "quantized"})}
    with pytest.raises(LowbitError, match="already exists"):
        render_ab(synthetic_result(), page, blind=False)


# ---- in a real browser --------------------------------------------------------------------------------------------

def chrome(downloads: Path):
    """Headless Chromium through selenium, saving downloads into ``downloads``; a missing browser is a failure
    that says how to install it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: `make install` installs chromium and chromedriver")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


def wait_for(path: Path, seconds: float = 20) -> str:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.is_file() and path.stat().st_size > 0:
            return path.read_text()
        time.sleep(0.1)
    pytest.fail(f"the page did not save {path.name} within {seconds} s")


def restored_after_reload(driver, seconds: float = 10) -> dict:
    """The votes the page shows after a reload. Chromium commits local storage asynchronously, so a reload right
    after the last click may still read the old value (the page then shows none, and does not overwrite what
    was stored): reload again until the votes are back or ``seconds`` have passed."""
    from selenium.webdriver.common.by import By

    end = time.monotonic() + seconds
    while True:
        driver.refresh()
        votes = json.loads(driver.find_element(By.ID, "votes").get_property("value"))["votes"]
        if votes or time.monotonic() > end:
            return votes
        time.sleep(0.3)


def test_clicked_votes_are_what_the_page_saves_and_the_cli_tallies(tmp_path, capsys):
    from selenium.webdriver.common.by import By

    gen = tmp_path / "generation.json"
    gen.write_text(json.dumps(synthetic_result()))
    assert main(["ab", "page", str(gen), "--seed", "7"]) == 0
    page, key_path = tmp_path / "ab.html", tmp_path / "ab.key.json"
    key = json.loads(key_path.read_text())
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    clicks = [("p0", "A"), ("p1", "tie"), ("p2", "B"), ("p3", "B"), ("p3", "A"), ("p4", "B"), ("p4", "B")]
    expected = {"p0": "A", "p1": "tie", "p2": "B", "p3": "A"}  # p3 changed its mind, p4 cleared, p5 never voted

    driver = chrome(downloads)
    try:
        driver.get(page.resolve().as_uri())
        for item_id, choice in clicks:
            driver.find_element(By.CSS_SELECTOR, f'button.vote[data-id="{item_id}"][data-choice="{choice}"]').click()
        shown = json.loads(driver.find_element(By.ID, "votes").get_property("value"))
        assert shown == {"format": "lowbit-ab-votes", "format_version": 1, "page_id": key["page_id"],
                         "prompts": len(TEXTS), "votes": expected}
        assert list(shown["votes"]) == ["p0", "p1", "p2", "p3"]  # in page order, whatever the click order
        chosen = {(b.get_attribute("data-id"), b.get_attribute("data-choice"))
                  for b in driver.find_elements(By.CSS_SELECTOR, "button.vote.chosen")}
        assert chosen == set(expected.items())
        assert driver.find_element(By.ID, "progress").text == f"4 of {len(TEXTS)} prompts voted"
        marks = driver.find_elements(By.CSS_SELECTOR, "section#p0 mark")
        assert [m.text.strip() for m in marks] == [{"original": "block", "quantized": "loop"}[key["sides"]["p0"][s]]
                                                   for s in "AB"]
        driver.find_element(By.ID, "save").click()
        saved = json.loads(wait_for(downloads / "votes.json"))
        assert saved == shown
        assert restored_after_reload(driver) == expected  # the votes survive a reload (local storage)
    finally:
        driver.quit()

    capsys.readouterr()
    assert main(["ab", "tally", str(downloads / "votes.json"), "--key", str(key_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    by_model = [key["sides"][i][c] for i, c in expected.items() if c != "tie"]
    assert (summary["quantized_preferred"], summary["original_preferred"], summary["ties"]) == (
        by_model.count("quantized"), by_model.count("original"), 1)
    assert summary["p_value"] == pytest.approx(binomtest(by_model.count("quantized"), 3, 0.5).pvalue)
    # the key really was applied: with every side swapped, the tally swaps too
    flipped = {**key, "sides": {i: {"A": s["B"], "B": s["A"]} for i, s in key["sides"].items()}}
    flipped_path = tmp_path / "flipped.key.json"
    flipped_path.write_text(json.dumps(flipped))
    assert main(["ab", "tally", str(downloads / "votes.json"), "--key", str(flipped_path), "--json"]) == 0
    swapped = json.loads(capsys.readouterr().out)
    assert (swapped["quantized_preferred"], swapped["original_preferred"]) == (
        summary["original_preferred"], summary["quantized_preferred"])
    assert main(["ab", "tally", str(downloads / "votes.json"), "--key", str(key_path)]) == 0
    table = capsys.readouterr().out
    assert "ties are excluded" in table and key["page_id"] in table


def test_cli_refuses_a_file_that_is_not_a_generation_result(tmp_path, capsys):
    bad = tmp_path / "report.json"
    bad.write_text(json.dumps({"model": "x"}))
    capsys.readouterr()
    assert main(["ab", "page", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a lowbit generation result" in err
    assert main(["ab", "tally", str(tmp_path / "none.json"), "--key", str(bad)]) == 2
    assert "votes file" in capsys.readouterr().err and not (tmp_path / "ab.html").exists()
