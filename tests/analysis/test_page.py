"""The compare page: the Pareto frontier, the written files, and the HTML as a real browser shows it."""

from __future__ import annotations

import math
import re
import shutil

import numpy as np
import pytest

from lowbit.analysis.frontier import pareto_front
from lowbit.analysis.page import render_compare
from lowbit.errors import LowbitError

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


# ---- frontier -------------------------------------------------------------------------------------------------

def brute_front(points):
    """Slow reference: every point no other point dominates; of exact duplicates the first."""
    keep = []
    for i, (x, y) in enumerate(points):
        dominated = any((a <= x and b <= y and (a < x or b < y)) or ((a, b) == (x, y) and j < i)
                        for j, (a, b) in enumerate(points) if j != i)
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i])


def test_front_by_hand():
    points = [(4.0, 0.10), (2.0, 0.50), (3.0, 0.20), (3.5, 0.30), (8.0, 0.01), (1.0, 0.90)]
    # (3.5, 0.30) is beaten by (3.0, 0.20); the rest trade size for error
    assert pareto_front(points) == [5, 1, 2, 0, 4]


def test_front_ties_are_deterministic():
    points = [(2.0, 0.5), (2.0, 0.5), (2.0, 0.3), (1.0, 0.3), (5.0, 0.3)]
    # same size: the smaller error wins; same error: the smaller size wins; duplicates: the first index
    assert pareto_front(points) == [3]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0]
    assert pareto_front([]) == []


def test_front_matches_brute_force_on_random_sets():
    rng = np.random.default_rng(0)
    for _ in range(50):
        points = [tuple(map(float, p)) for p in rng.integers(0, 6, size=(12, 2))]  # many ties
        assert pareto_front(points) == brute_front(points)


def test_front_refuses_nan():
    with pytest.raises(ValueError):
        pareto_front([(1.0, math.nan)])


# ---- a synthetic compare result ---------------------------------------------------------------------------------

def kld_stats(mean: float) -> dict:
    return {"kld_mean": mean, "kld_stderr": mean / 50, "kld_median": mean / 2, "kld_p90": mean * 2,
            "kld_p99": mean * 6, "kld_p999": mean * 15, "kld_max": mean * 40, "kld_min": 0.0, "same_top1": 0.9,
            "same_top1_stderr": 0.004, "rms_dp": 0.05, "rms_dp_stderr": 0.001, "ln_ppl_ratio": mean / 3,
            "ln_ppl_ratio_stderr": 0.002, "ppl_ratio": math.exp(mean / 3), "n": 4088}


def row(name, kind, size_mb, kld, fmt="lowbit", predicted=None, stats=True):
    return {"name": name, "kind": kind, "format": fmt, "scheme": "W4A16", "method": "rtn",
            "size_bytes": int(size_mb * 1e6), "bits_per_weight": 16 * size_mb / 270, "ppl": 11.9 * (1 + kld),
            "ppl_base": 11.9, "kld": kld, "top1": 1 - kld, "cosine": None, "seconds": 10 + size_mb / 10,
            "predicted_kld": predicted, "kld_stats": kld_stats(kld) if stats else None}


def synthetic_result(n_modules: int = 20) -> dict:
    rng = np.random.default_rng(1)
    rows = [row("W16A16 <original> & co", "scheme", 270, 0.0, stats=False),
            row("W8A16 rtn", "scheme", 145, 0.002),
            row("W4A16 g128 rtn", "scheme", 95, 0.08),
            row("W4A16 g128 gptq", "preset", 95, 0.05),
            row("Q4_K_M | llama.cpp", "gguf", 105, 0.06, fmt="gguf"),
            row("budget 4.5 bpw", "budget", 100, 0.04, predicted=0.035)]
    names = [f"model.layers.{i // 7}.{part}" for i, part in
             zip(range(n_modules), ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] * n_modules)]
    kld = rng.gamma(2.0, 0.01, n_modules)
    modules = [{"name": n, "kld": float(k), "proxy": float(k * rng.uniform(0.7, 1.3))} for n, k in zip(names, kld)]
    w = rng.standard_normal(4000) * 0.02
    layers = [{"name": "model.layers.3.mlp.down_proj", "spec": "int3:g128:asym", "weights": w,
               "errors": rng.uniform(-1, 1, 4000) * 0.003},
              {"name": "model.layers.0.self_attn.q_proj", "spec": "int4:g128", "weights": w * 2,
               "errors": rng.standard_normal(4000) * 0.001}]
    return {"model": "smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF)", "note": "synthetic numbers <b>not</b> measured",
            "eval": {"text": "pydoc_data.topics", "windows": 8, "window_length": 512, "tokens": 4096},
            "rows": rows, "sensitivity": {"spec": "int3:g128:asym", "modules": modules,
                                          "spearman": {"hessian": 0.71, "fisher": 0.86}},
            "layers": layers}


def test_render_writes_both_files(tmp_path):
    result = synthetic_result()
    html_path, md_path = render_compare(result, tmp_path / "out")
    assert html_path == tmp_path / "out" / "compare.html" and md_path == tmp_path / "out" / "compare.md"
    page, md = html_path.read_text(), md_path.read_text()
    assert not re.search(r"https?://", page, re.I), "the HTML must not reference anything outside itself"
    assert "<script" not in page.lower()
    assert page.count('class="plot"') == 4  # pareto, sensitivity, 2 layers
    assert "&lt;b&gt;not&lt;/b&gt;" in page and "<b>not</b>" not in page  # escaped text
    assert 'id="results"' in page and 'id="kld-stats"' in page
    assert "Predicted KLD" in page and "Spearman" not in page  # the Spearman values are in the plot title
    # the Markdown table has every row, in order, and its plots exist beside it
    for r in result["rows"]:
        assert re.search(r"^\| " + re.escape(r["name"].replace("&", "&amp;").replace("<", "&lt;")
                                             .replace(">", "&gt;").replace("|", "\\|")) + " \\|", md, re.M), r["name"]
    table = [line for line in md.split("## KL-divergence")[0].splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(result["rows"])
    links = re.findall(r"!\[[^\]]*\]\((plots/[^)]+)\)", md)
    assert len(links) == 4 and all((tmp_path / "out" / link).stat().st_size > 1000 for link in links)
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporary left behind
    # the frontier: the original (smallest error), W8A16, gptq, budget; W4A16 rtn and the gguf are beaten
    marked = re.findall(r'<tr class="frontier"><td>([^<]*)</td>', page)
    assert marked == ["W16A16 &lt;original&gt; &amp; co", "W8A16 rtn", "W4A16 g128 gptq", "budget 4.5 bpw"]


def test_rendering_again_replaces_the_files(tmp_path):
    render_compare(synthetic_result(), tmp_path)
    result = synthetic_result()
    result["layers"] = []
    _, md = render_compare(result, tmp_path)
    assert len(list((tmp_path / "plots").iterdir())) == 2 and md.read_text().count("](plots/") == 2


def test_encoder_rows_render_with_cosine(tmp_path):
    rows = [{**row(f"enc {b}", "scheme", 20 * b, 0.0, stats=False), "ppl": None, "ppl_base": None, "kld": None,
             "top1": None, "cosine": 1 - 0.01 / b} for b in (2, 4, 8)]
    page, md = (p.read_text() for p in render_compare({"model": "minilm", "eval": {"text": "t", "sentences": 64},
                                                        "rows": rows, "sensitivity": None, "layers": []}, tmp_path))
    assert "Cosine" in page and "KLD" not in md.split("## Size")[0] and page.count('class="plot"') == 1
    assert "1 - embedding cosine" in page


@pytest.mark.parametrize("key", ["kld", "ppl", "seconds"])
def test_nonfinite_row_is_refused(tmp_path, key):
    result = synthetic_result()
    result["rows"][2][key] = math.nan
    with pytest.raises(LowbitError, match="W4A16 g128 rtn"):
        render_compare(result, tmp_path)
    assert not (tmp_path / "compare.html").exists()


def test_nonfinite_kld_stats_is_refused(tmp_path):
    result = synthetic_result()
    result["rows"][4]["kld_stats"]["kld_p99"] = math.inf
    with pytest.raises(LowbitError, match="Q4_K_M"):
        render_compare(result, tmp_path)


# ---- in a real browser ------------------------------------------------------------------------------------------

def chrome():
    """Headless Chromium through selenium; a missing browser is a failure that says how to install it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: `make install` installs chromium and chromedriver")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_page_in_headless_chromium(tmp_path):
    from matplotlib.image import imread
    from selenium.webdriver.common.by import By

    result = synthetic_result()
    html_path, _ = render_compare(result, tmp_path / "page")
    driver = chrome()
    try:
        driver.set_window_size(1300, 900)
        driver.get(html_path.resolve().as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "table#results tr")
        assert len(rows) == 1 + len(result["rows"])
        assert driver.find_element(By.CSS_SELECTOR, "table#results tbody tr td").text == result["rows"][0]["name"]
        images = driver.find_elements(By.CSS_SELECTOR, "img.plot")
        assert len(images) == 4
        for img in images:
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
            assert img.is_displayed() and img.get_attribute("alt")
        size = "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
        width, height = driver.execute_script(size)
        for _ in range(3):  # the window is larger than its viewport by the (headless) browser frame
            driver.set_window_size(width, height)
            inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
            if inner[1] >= driver.execute_script(size)[1]:
                break
            width, height = width + width - inner[0], height + height - inner[1]
        width, height = driver.execute_script(size)
        assert driver.execute_script("return window.innerHeight") >= height, "the window should show the whole page"
        shot = tmp_path / "compare.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    pixels = imread(shot)[..., :3]  # floats in [0, 1]
    assert pixels.shape[0] >= height, "the screenshot should cover the whole page"
    assert pixels.std() > 0.05, "the screenshot is blank"
    assert (pixels.min(axis=-1) < 0.5).mean() > 0.01, "too few dark (text or plot) pixels"
