"""The live page in a real browser: headless Chromium (the system's, with its chromedriver)
opens the page of a running daemon, sees the live picture change, draws a zone on the left
half of the picture by clicking, saves it, and a `zone_enter` for it arrives over MQTT.

The daemon runs on a panning clip over held-out images (coco8 val), looped. The page's
screenshot is saved beside the test's files, and as docs/img/live-view.png where that is
missing or EDGE_UPDATE_SCREENSHOT=1 (the one in the docs is taken this way).
"""

import os
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np
import pytest

from tests.conftest import ROOT, free_port
from tests.test_web import TOKEN, request, start
from tools.soak import stop_edge

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,1000")
VAL = os.path.join(os.path.dirname(ROOT), "shared", "data", "coco8", "images", "val")
SCREENSHOT = os.path.join(ROOT, "docs", "img", "live-view.png")

try:
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

pytestmark = [
    pytest.mark.skipif(webdriver is None, reason="selenium is missing (pip install -e .[test])"),
    pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
                       reason="chromium or chromedriver is missing (sudo apt-get install "
                              "chromium chromium-driver)"),
]


def pan_frames(folder, frames=45):
    """A camera panning over two held-out photographs (a woman with an umbrella, elephants
    with riders), 640x480, as numbered JPEGs: the objects cross the picture from right to
    left."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import pan_clip
    return pan_clip.write_folder(folder, [os.path.join(VAL, "000000000036.jpg"),
                                          os.path.join(VAL, "000000000061.jpg")], frames)


@pytest.fixture
def browser():
    profile = tempfile.mkdtemp(prefix="edge-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument("--user-data-dir=" + profile)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def picture(element):
    """What the browser shows of an element now, as pixels."""
    data = np.frombuffer(element.screenshot_as_png, np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def test_the_live_page_shows_the_picture_and_draws_a_zone_that_counts(
        tmp_path, broker, subscriber, model_dir, browser):
    (tmp_path / "pan").mkdir()
    frames = pan_frames(str(tmp_path / "pan"))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    args = ["--source", "cam=images://{}?loop=1".format(frames), "--detector", "yolox-nano",
            "--model-dir", model_dir, "--mqtt", broker.url, "--device-id", "d1"]
    sub = subscriber("edge/d1/events/#")
    proc = start(tmp_path, port, args, "web: {token_file: %s}\n" % token_file,
                 str(tmp_path / "state"))
    try:
        browser.get("http://127.0.0.1:{}/?token={}".format(port, TOKEN))
        wait = WebDriverWait(browser, 15)
        card = wait.until(lambda d: d.find_element(By.ID, "camera-cam"))
        img = card.find_element(By.CSS_SELECTOR, "img.live")
        wait.until(lambda d: img.get_property("naturalWidth") == 640)
        wait.until(lambda d: card.find_element(By.CSS_SELECTOR, ".state").text == "open")
        verdict = browser.find_element(By.ID, "verdict")
        assert verdict.text in ("online", "starting"), verdict.get_attribute("title")

        # the live picture changes within 3 s
        first = picture(img)
        changed = False
        deadline = time.monotonic() + 3.0
        while not changed and time.monotonic() < deadline:
            time.sleep(0.3)
            changed = np.abs(picture(img).astype(int) - first.astype(int)).mean() > 2.0
        assert changed, "the live picture did not change within 3 s"

        # a zone over the left half, clicked on the picture (offsets from its centre)
        card.find_element(By.CSS_SELECTOR, "button.draw-zone").click()
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", img)
        width, height = img.size["width"], img.size["height"]
        for fx, fy in ((0.01, 0.02), (0.5, 0.02), (0.5, 0.98), (0.01, 0.98)):
            ActionChains(browser).move_to_element_with_offset(
                img, int((fx - 0.5) * width), int((fy - 0.5) * height)).click().perform()
        assert card.find_element(By.CSS_SELECTOR, "polyline.shape").get_attribute(
            "data-count") == "4"
        card.find_element(By.CSS_SELECTOR, "input.item-name").send_keys("lefthalf")
        card.find_element(By.CSS_SELECTOR, "button.save").click()
        wait.until(lambda d: card.find_elements(By.CSS_SELECTOR,
                                                'ul.items li[data-name="lefthalf"]'))
        assert "Saved zone lefthalf" in card.find_element(By.CSS_SELECTOR, ".message").text
        status, zones = request(port, "GET", "/api/cameras/cam/zones")
        assert status == 200 and [z["name"] for z in zones] == ["lefthalf"]
        xs = [p[0] for p in zones[0]["points"]]
        assert zones[0]["normalized"] and max(xs) == pytest.approx(0.5, abs=0.02), zones
        assert min(xs) == pytest.approx(0.01, abs=0.02), zones

        # the objects that walk into the left half enter it: events over MQTT
        assert sub.wait_for(lambda s: any(e["type"] == "zone_enter" and e["zone"] == "lefthalf"
                                          for e in s.json("events/cam")), 20), \
            [(e["type"], e.get("zone")) for e in sub.json("events/cam")][-10:]

        # the health panel is filled; nothing went wrong in the page
        assert browser.find_element(By.ID, "device").text == "d1"
        assert browser.find_elements(By.CSS_SELECTOR, "#figures th")
        severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not severe, severe

        time.sleep(0.5)         # the zone's outline in the picture too
        shot = str(tmp_path / "live-view.png")
        browser.save_screenshot(shot)
        if not os.path.exists(SCREENSHOT) or os.environ.get("EDGE_UPDATE_SCREENSHOT") == "1":
            os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
            shutil.copy(shot, SCREENSHOT)
    finally:
        assert stop_edge(proc) == 0
