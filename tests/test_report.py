"""The HTML leaderboard in a real browser (headless Chromium through Selenium and chromedriver, Debian's
`chromium` and `chromium-driver`): it fits a 1400 px window, sorts on a header click, shows every sample grid
and lists each skipped-metric reason once. `.ci/run` installs the browser and sets GENBENCH_REQUIRE_BROWSER=1,
which turns a missing browser into a failure; elsewhere these tests skip with the reason."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import leaderboard
from pipeline.data.imageops import save_png
from pipeline.io import write_new_json

NO_WEIGHTS = "InceptionV3 weights not found; run genbench fetch-weights on a machine with internet"
TOO_FEW = "precision/recall need at least 4 samples per set"


def _browser_problem() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for exe in ("chromium", "chromedriver"):
        if shutil.which(exe) is None:
            return f"{exe} not found (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser():
    problem = _browser_problem()
    if problem:
        if os.environ.get("GENBENCH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"GENBENCH_REQUIRE_BROWSER=1 but {problem}")
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    # the driver from Debian's package: Selenium Manager would try to download one
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _record(results: Path, run: str, family: str, fd: float, n: int = 1000, images_seen: int = 76800,
            reference_row: str | None = None, skipped: dict | None = None, copy_rate: float | None = None) -> None:
    grid = torch.from_numpy(np.random.default_rng(len(run)).integers(0, 256, (1, 73, 73), dtype=np.uint8))
    save_png(grid, results / "grids" / f"{run}.png", scale=4)
    if copy_rate is not None:  # the memorisation audit's closest pairs: 8 rows of (generated, training)
        pairs = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 81, 19), dtype=np.uint8))
        save_png(pairs, results / "grids" / f"{run}-closest.png", scale=4)
    record = {
        "record_version": 2, "name": run, "created": "2026-11-30T00:00:00", "run_id": run, "family": family,
        "metrics": {"fd_auditor": fd, "fd_auditor_inf": 0.9 * fd, "audit": {"kl_to_reference": fd / 10, "coverage": 1.0,
                                                "fairness_discrepancy": 0.05}},
        "skipped": skipped if skipped is not None else {"fid": NO_WEIGHTS, "is": NO_WEIGHTS},
        "protocol": {"protocol_id": "p1", "num_samples": n, "seed": 0, "repeats": 1,
                     "reference": {"kind": "shards", "path": "shards/digits", "hash": "8ed540071ff9abcdef:train"},
                     "extractors": {"auditor": {"sha256": "52373272b68e" * 4, "val_accuracy": 0.99}},
                     "sampling": {"precision": "fp32", "compiled": False}},
        "cost": {"parameters": 277_922, "nfe": 1, "images_seen": images_seen, "device_hours": 0.02,
                 "sampling_images_per_s": 5000.0 / fd, "bits_per_dim": 3.5},
        "sample_grid": f"grids/{run}.png",
    }
    if copy_rate is not None:
        record["metrics"]["memorization"] = {"copy_rate": copy_rate, "authpct": 60.0, "ct_score": -1.5,
                                             "space": "pixels"}
        record["closest_pairs_grid"] = f"grids/{run}-closest.png"
    if reference_row:
        record["reference_row"] = reference_row
    write_new_json(results / f"{run}.json", record)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("results")
    long = "digits-ddpm-with-a-rather-long-experiment-name-912cdca3"
    _record(results, long, "ddpm", 1.46, copy_rate=0.012)
    _record(results, "digits-ar-a055da0f", "ar", 2.08, copy_rate=0.0)
    _record(results, "digits-vae-7294d3fa", "vae", 2.19, skipped={"fid": NO_WEIGHTS, "is": NO_WEIGHTS,
                                                                  "pr": TOO_FEW})
    _record(results, "digits-gan-44a786bc", "gan", 4.95, n=500, images_seen=96000)
    _record(results, "reference: held-out validation split", "reference", 0.49, n=180, reference_row="floor",
            copy_rate=0.006)
    _record(results, "reference: uniform noise", "reference", 36.9, reference_row="ceiling")
    out = results.parent / "board"
    leaderboard.build(results, out, wandb="off")
    return out / "leaderboard.html"


def test_the_report_fits_1400_px_sorts_shows_its_grids_and_explains_what_is_missing(browser, report):
    from selenium.webdriver.common.by import By

    browser.get(report.resolve().as_uri())
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 1400

    # ranked best first; a click on the primary metric's header sorts by it, a second click reverses it
    def column_values(index):
        return [row.find_elements(By.TAG_NAME, "td")[index].get_attribute("data-v")
                for row in browser.find_elements(By.CSS_SELECTOR, "#board tbody tr")]

    # one row was scored on N=500, the others on 1,000: ranked by FD-infinity, which N does not bias, and said so
    headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#board th")]
    primary = headers.index("fd_auditor_inf ↓")
    assert "different sample counts (500, 1,000)" in browser.find_element(By.TAG_NAME, "body").text
    ranked = [float(v) for v in column_values(primary)]
    assert ranked == sorted(ranked)
    header = browser.find_elements(By.CSS_SELECTOR, "#board th")[primary]
    header.click()
    header.click()
    assert [float(v) for v in column_values(primary)] == sorted(ranked, reverse=True)

    # every grid is decoded and shown, the floor's too
    images = browser.find_elements(By.CSS_SELECTOR, "img.grid:not(.pairs)")
    assert len(images) == 6
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
               for img in images)
    assert all(img.size["width"] >= 250 for img in images)
    # the memorisation audit: a column, and the closest pairs of the rows that have them, floor included
    assert "memorization ↓" in headers
    pairs = browser.find_elements(By.CSS_SELECTOR, "img.grid.pairs")
    assert len(pairs) == 3 and all(
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img) for img in pairs)
    captions = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "figure[id^=closest] figcaption")]
    assert any("held-out" in c and "copy rate 0.006" in c for c in captions)

    # each reason once, with the metrics it explains
    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "ul.skipped li")]
    assert len(items) == 2
    assert browser.find_element(By.TAG_NAME, "body").text.count(NO_WEIGHTS) == 1
    assert items[0].startswith("fid, is (every row): InceptionV3") and items[1].startswith("pr (digits-vae-7294d3fa)")

    # the odd rows are flagged, the folded columns unfold
    flags = browser.find_elements(By.CSS_SELECTOR, "span.flag")
    assert len(flags) == 1 and "N=500" in flags[0].get_attribute("title")
    secondary = browser.find_element(By.CSS_SELECTOR, "#board th.secondary")
    assert not secondary.is_displayed()
    browser.find_element(By.ID, "all-columns").click()
    assert secondary.is_displayed()
