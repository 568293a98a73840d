"""The viewer end to end in a real browser: the metaseg server and `metaseg ui` as subprocesses, Debian's headless
Chromium driven by Selenium, a PNG and then a DICOM series dropped on the uploader; the series is scrolled,
thresholded and score-filtered, and its mask files are made, which must send nothing to the server (its access log
counts the requests); three NIfTI sequences dropped on the main box are pointed to the sequence boxes, and filled in
there they are segmented once, on Segment.

The server runs the attention_unet bundle with seeded random weights at spatial_size 32 (as in test_serve): what
matters here is that the overlay, the findings and the downloads reach the page, not what the model finds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conftest import REPO
from test_engine import random_weights
from test_ui import SERIES, blobs, dicom_series, free_port, nifti_files, png

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="Debian's chromium and chromium-driver are not installed (`make setup` installs them)",
)


@contextmanager
def running(command: list[str], env: dict, ready_url: str, log: Path):
    """A subprocess in its own process group, up once `ready_url` answers 200; the whole group is stopped after."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"{command[2:5]} exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{ready_url} did not answer:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # `metaseg ui` runs streamlit as a child: stop the group
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def viewer(tmp_path: Path, weights: Path, server_args: dict[str, str]):
    """URL of the viewer, a client of a server that serves `weights` with METASEG_* `server_args` and writes its
    access log, unbuffered, to tmp_path / "server.log"."""
    server_port, ui_port = free_port(), free_port()
    server = f"http://127.0.0.1:{server_port}"
    env = {**os.environ, "METASEG_BUNDLE": "attention_unet", "METASEG_WEIGHTS": str(weights), **server_args,
           "PYTHONUNBUFFERED": "1"}
    with (
        running([sys.executable, "-m", "uvicorn", "--factory", "serve.main:create_app", "--host", "127.0.0.1",
                 "--port", str(server_port), "--log-level", "info"], env, f"{server}/health", tmp_path / "server.log"),
        running([sys.executable, "-m", "metaseg.cli", "ui", "--server", server, "--port", str(ui_port)],
                dict(os.environ), f"http://127.0.0.1:{ui_port}/_stcore/health", tmp_path / "viewer.log"),
    ):
        yield f"http://127.0.0.1:{ui_port}"


@contextmanager
def chromium(tmp_path: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1600,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()  # also ends chromedriver and every chromium process it started


def wait(driver, timeout: float) -> WebDriverWait:
    """A wait that looks again when the page redrew an element it held (a Streamlit rerun replaces elements)."""
    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,))


def shown(driver, css: str, count: int = 1, text: str = "", timeout: float = 120) -> list:
    """Wait until at least `count` elements match `css` (and one of them contains `text`), and return them."""

    def found(d):
        elements = d.find_elements(By.CSS_SELECTOR, css)
        return elements if len(elements) >= count and any(text in e.text for e in elements) else False

    try:
        return wait(driver, timeout).until(found)
    except TimeoutException:
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stAlert"]')]
        pytest.fail(f"no {count} x {css} containing {text!r} within {timeout} s; alerts on the page: {errors}")


def drop(driver, url: str, paths: list[Path]) -> None:
    """Open a fresh session of the viewer and drop the files on its uploader."""
    driver.get(url)
    shown(driver, '[data-testid="stSidebar"] [data-testid="stAlert"]', text="Up, model loaded")
    put(driver, 0, paths)


def put(driver, uploader: int, paths: list[Path]) -> None:
    """Drop files on an uploader of the page: 0 the main box, 1-3 pre-contrast, FLAIR, post-contrast."""
    shown(driver, 'input[type="file"]', count=uploader + 1)[uploader].send_keys("\n".join(str(p) for p in paths))
    shown(driver, '[data-testid="stFileChipName"]', text=paths[-1].name, timeout=60)


def click(driver, text: str) -> None:
    """Click the button labelled `text` once it is enabled."""
    def enabled(d):
        found = [b for b in shown(d, "button", text=text) if b.text == text and b.is_enabled()]
        return found[0] if found else False

    wait(driver, 60).until(enabled, f"no enabled {text!r} button").click()


def segmented(driver) -> dict[str, str]:
    """Wait for the input, the overlay, the findings and the slice downloads; return the metrics shown."""
    shown(driver, '[data-testid="stMainBlockContainer"] [data-testid="stImage"] img', count=2)
    shown(driver, '[data-testid="stDownloadButton"]', count=2, text="Overlay PNG")
    metrics = shown(driver, '[data-testid="stMetric"]', count=2, text="Lesions")
    return dict(m.text.split("\n", 1) for m in metrics)


def posts(log: Path) -> list[str]:
    """Path and query of each request that carried an upload, from the server's access log."""
    return [line.split('"')[1].split(" ")[1] for line in log.read_text().splitlines() if '"POST /segment' in line]


def slide(driver, label: str, presses: int, key: str | None = None) -> str:
    """Move a slider by `presses` steps with the keyboard (up, or down from its end; or `key` pressed that often), as
    a reader scrolls through slices; its new value."""
    def thumb(d) -> object:  # visually hidden: focused, then typed at
        slider = next(s for s in shown(d, '[data-testid="stSlider"]', text=label) if label in s.text)
        return slider.find_element(By.CSS_SELECTOR, 'input[type="range"]')

    def focus(d) -> tuple[str, str]:
        element = thumb(d)
        d.execute_script("arguments[0].focus()", element)
        return element.get_attribute("value"), element.get_attribute("max")

    start, end = wait(driver, 30).until(focus)
    key = key or (Keys.ARROW_LEFT if start == end else Keys.ARROW_RIGHT)
    ActionChains(driver).send_keys(*[key] * presses).perform()

    def moved(d) -> str | bool:
        value = thumb(d).get_attribute("value")
        return value != start and value

    return wait(driver, 30).until(moved, f"{label} did not move")


def shown_input(driver) -> str:
    """The source of the shown input image (a media URL that changes with the picture)."""
    return shown(driver, '[data-testid="stMainBlockContainer"] [data-testid="stImage"] img', count=2)[0] \
        .get_attribute("src")


def test_a_png_and_a_dicom_series_are_segmented_once_and_scrolled_without_the_server(tmp_path):
    weights = random_weights("attention_unet", tmp_path / "model")
    slice_png = tmp_path / "slice.png"
    slice_png.write_bytes(png(blobs((96, 128), ((30, 70, 12, 16),))))
    series = []
    for name, data in dicom_series([image.astype(np.uint16) * 4 for image in SERIES]):
        series.append(tmp_path / name)
        series[-1].write_bytes(data)
    log = tmp_path / "server.log"
    bundle = shutil.copytree(REPO / "bundles" / "attention_unet", tmp_path / "bundle",
                             ignore=shutil.ignore_patterns("models"))
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["inference_steps"]["min_lesion_score"] = 0.95  # a served score, whatever the shipped steps are
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))

    with viewer(tmp_path, weights, {"METASEG_SPATIAL_SIZE": "32", "METASEG_BUNDLE": str(bundle)}) as url, \
            chromium(tmp_path) as driver:
        drop(driver, url, [slice_png])
        metrics = segmented(driver)
        assert metrics["Total area"].endswith("px") and "Total volume" not in metrics  # a PNG slice: no volume
        driver.save_screenshot(str(tmp_path / "viewer-png.png"))

        drop(driver, url, series)
        metrics = segmented(driver)
        assert metrics["Total volume"].endswith("mL") and "Measurable" in metrics  # a series with its spacing
        shown(driver, '[data-testid="stCaptionContainer"]', text="of 3 (red above")  # the lesion slices
        asked = posts(log)
        assert asked == ["/segment/probabilities"] * 2  # once for the PNG, once for the series

        before = shown_input(driver)
        slide(driver, "Slice", 1)
        wait(driver, 60).until(lambda d: shown_input(d) != before, "the slice did not change")
        threshold = f"{float(slide(driver, 'Probability threshold', 2)):g}"
        shown(driver, '[data-testid="stImage"]', text=f"threshold {threshold}")
        assert posts(log) == asked  # scrolled and thresholded here, from the probabilities of the first request

        next(b for b in shown(driver, "button", text="Prepare") if "Prepare" in b.text).click()
        shown(driver, '[data-testid="stDownloadButton"]', count=4, text="DICOM SEG")
        assert posts(log) == asked  # the mask files are made here, from the masks shown

        # the random weights score every lesion under the served min_lesion_score (0.95): all filtered, not hidden
        shown(driver, '[data-testid="stMetric"]', count=4, text="Lesions\n0")
        filtered = next(m.text for m in shown(driver, '[data-testid="stMetric"]', count=4, text="Filtered by score")
                        if m.text.startswith("Filtered by score")).split("\n")[1]
        shown(driver, '[data-testid="stImage"]', text="pale: under lesion score 0.95")
        assert float(slide(driver, "Lesion score", 1, Keys.HOME)) == 0  # a score that filters nothing
        shown(driver, '[data-testid="stMetric"]', text=f"Lesions\n{filtered}")  # the same lesions, now kept
        wait(driver, 60).until(lambda d: not [m for m in d.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]')
                                              if "Filtered" in m.text], "lesions still filtered at score 0")
        assert posts(log) == asked
        assert driver.save_screenshot(str(tmp_path / "viewer-dicom.png"))


def test_sequences_wait_for_segment_and_run_once_and_the_page_states_the_servers_limit(tmp_path):
    weights = random_weights("attention_unet", tmp_path / "model")
    trio = []
    for name, data in nifti_files(["t1.nii.gz", "flair.nii.gz", "t1c.nii.gz"]):
        trio.append(tmp_path / name)
        trio[-1].write_bytes(data)
    log = tmp_path / "server.log"

    with viewer(tmp_path, weights, {"METASEG_SPATIAL_SIZE": "32"}) as url, chromium(tmp_path) as driver:
        drop(driver, url, trio)
        shown(driver, '[data-testid="stAlert"]', text="Put each in its box under Sequences in separate files")
        zones = '[data-testid="stFileUploaderDropzoneInstructions"]'
        wait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, zones)) >= 3 and all(  # all rendered
            "per file" in e.text for e in d.find_elements(By.CSS_SELECTOR, zones)), "the uploaders state no limit")
        limits = [e.text for e in driver.find_elements(By.CSS_SELECTOR, zones)]
        assert all("64MB per file" in text for text in limits), limits  # the server's 64 MiB, not Streamlit's 200
        assert "200MB" not in driver.find_element(By.TAG_NAME, "body").text
        sidebar = shown(driver, '[data-testid="stSidebar"]')[0].text
        assert "Up, model loaded; idle" in sidebar and "slot" not in sidebar and "SegmentationReport" not in sidebar

        for uploader, path in enumerate(trio, start=1):  # left to right, as a user fills the boxes
            put(driver, uploader, [path])
            alerts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stAlert"]')]
            assert not any("missing" in text for text in alerts), alerts
        assert posts(log) == []  # nothing segmented while the user chooses
        click(driver, "Segment")
        metrics = segmented(driver)
        assert "Total volume" in metrics
        shown(driver, '[data-testid="stCaptionContainer"]', text="The model got all three sequences")
        assert posts(log) == ["/segment/probabilities"]  # once, with the three sequences
        driver.save_screenshot(str(tmp_path / "viewer-sequences.png"))
