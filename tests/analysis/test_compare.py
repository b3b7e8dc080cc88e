"""lowbit compare on a tiny model: one row per option (schemes, a GGUF type measured in llama.cpp, a preset, a
budgeted mix) on the same tokens, the page seen in headless Chromium, and a rerun that resumes from the rows."""

from __future__ import annotations

import json

import pytest

from lowbit.cli import main
from tests.analysis.test_page import chrome
from tests.arch_models import save_tiny

ARGS = ["--schemes", "W8A16,W3A16", "--formats", "gguf:Q8_0", "--presets", "edge", "--target-bpw", "4",
        "--candidates", "int3:g32:asym,int4:g32:asym,int8:channel", "--group-size", "32", "--windows", "2",
        "--window-length", "64"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    folder = save_tiny("llama", root / "model")
    out = root / "cmp"
    mp = pytest.MonkeyPatch()
    mp.setenv("LOWBIT_CACHE", str(root / "cache"))
    try:
        assert main(["compare", str(folder), "--out", str(out), *ARGS]) == 0
    finally:
        mp.undo()
    return folder, out, root


def test_every_row_is_measured_on_the_same_tokens(compared):
    _, out, _ = compared
    result = json.loads((out / "compare.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["W8A16 g32 rtn", "W3A16 g32 rtn", "gguf Q8_0 rtn", "preset edge", "mix 4 bpw rtn"]
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["W8A16 g32 rtn"]["kld"] < rows["W3A16 g32 rtn"]["kld"]
    assert rows["gguf Q8_0 rtn"]["format"] == "gguf" and rows["gguf Q8_0 rtn"]["kld"] < rows["W3A16 g32 rtn"]["kld"]
    assert rows["mix 4 bpw rtn"]["predicted_kld"] > 0
    assert all(r["kld_stats"]["n"] == 2 * 63 for r in result["rows"])
    assert len({r["ppl_base"] for r in result["rows"]}) == 1 or max(
        abs(r["ppl_base"] - result["rows"][0]["ppl_base"]) for r in result["rows"]) < 1e-3 * result["rows"][0]["ppl_base"]
    assert result["sensitivity"]["modules"] and result["eval"]["tokens"] == 128


def test_rerun_resumes_from_finished_rows(compared, monkeypatch):
    folder, out, root = compared
    import lowbit.analysis.compare as compare

    def refuse(*_):
        raise AssertionError("a finished row was measured again")

    monkeypatch.setattr(compare, "_measure_row", refuse)
    monkeypatch.setenv("LOWBIT_CACHE", str(root / "cache"))
    assert main(["compare", str(folder), "--out", str(out), *ARGS]) == 0


def test_the_page_in_headless_chromium(compared, tmp_path):
    from matplotlib.image import imread
    from selenium.webdriver.common.by import By

    _, out, _ = compared
    driver = chrome()
    try:
        driver.set_window_size(1400, 5000)
        driver.get((out / "compare.html").resolve().as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "table#results tbody tr")
        assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == [
            "W8A16 g32 rtn", "W3A16 g32 rtn", "gguf Q8_0 rtn", "preset edge", "mix 4 bpw rtn"]
        images = driver.find_elements(By.CSS_SELECTOR, "img.plot")
        assert len(images) >= 3  # Pareto, sensitivity bars, layer histograms
        for img in images:
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
            assert img.is_displayed()
        shot = tmp_path / "compare.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    pixels = imread(shot)[..., :3]
    assert pixels.std() > 0.05 and (pixels.min(axis=-1) < 0.5).mean() > 0.01
    md = (out / "compare.md").read_text()
    assert all(name in md for name in ("W8A16 g32 rtn", "gguf Q8_0 rtn", "mix 4 bpw rtn"))
