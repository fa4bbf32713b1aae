"""The web page in headless Chromium: upload images, ask, see the streamed answer and the boxes drawn
over the right image, regenerate, clear, and see a clear error for a bad image.

Needs Debian's `chromium` and `chromium-driver` (the Makefile's install step adds them) and the
`selenium` package; the browser is started with --no-sandbox --disable-background-networking and a
fresh profile, and only ever talks to the test server on 127.0.0.1.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from scripted_model import ScriptedModel
from tiny_checkpoint import write_tiny_checkpoint
from PIL import Image

from qwenvl.config import GenerationConfig
from qwenvl.server import BackgroundServer, ServeConfig, create_app
from qwenvl.tokenizer import QWenTokenizer
from qwenvl.weights import load_model

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "") if p and os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMEDRIVER is None or CHROMIUM is None,
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")

ANSWER = "<ref>the square</ref><box>(100,200),(500,600)</box> is there"




@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("web_model")
    write_tiny_checkpoint(d, layers=1)
    tokenizer = QWenTokenizer.from_pretrained(d)
    model = ScriptedModel(load_model(d, "float32").eval(), tokenizer.encode(ANSWER), tokenizer.im_end_id)
    app = create_app(model, tokenizer, GenerationConfig(), ServeConfig(model_name="tiny", max_batch=1, max_len=512))
    with BackgroundServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-background-networking", "--disable-gpu",
                 "--disable-dev-shm-usage", "--disable-extensions", "--disable-sync", "--disable-component-update",
                 "--no-first-run", "--window-size=1000,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def pictures(tmp_path) -> list[Path]:
    paths = []
    for name, size, colour in (("wide.png", (200, 100), (200, 30, 30)), ("tall.png", (60, 120), (30, 30, 200))):
        buf = io.BytesIO()
        Image.new("RGB", size, colour).save(buf, "PNG")
        (tmp_path / name).write_bytes(buf.getvalue())
        paths.append(tmp_path / name)
    return paths


def wait(driver, condition, timeout: float = 20):
    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def ask(driver, text: str) -> None:
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()


def answers(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']")


def test_upload_ask_see_answer_and_boxes_regenerate_clear(server, browser, pictures, tmp_path):
    browser.get(server.url + "/")
    browser.find_element(By.ID, "file").send_keys("\n".join(str(p) for p in pictures))   # two images at once
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pending img")) == 2)
    ask(browser, "Where is the square?")
    done = wait(browser, lambda d: answers(d))
    answer = done[0]
    assert answer.find_element(By.CSS_SELECTOR, ".text").text == "the square is there"
    figure = answer.find_element(By.CSS_SELECTOR, "figure.boxes")
    assert figure.find_element(By.TAG_NAME, "img").get_attribute("alt") == "Picture 2 with boxes"   # the latest image
    box = figure.find_element(By.CSS_SELECTOR, ".box")
    assert box.find_element(By.CSS_SELECTOR, ".box-label").text == "the square"
    style = box.get_attribute("style")
    assert "left: 10%" in style and "top: 20%" in style and "width: 40%" in style
    browser.save_screenshot(str(tmp_path / "page.png"))

    browser.find_element(By.ID, "regenerate").click()                # the last answer is asked again
    wait(browser, lambda d: len(answers(d)) == 1 and d.find_element(By.ID, "regenerate").is_enabled())
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .box")) == 1

    ask(browser, "And now?")                                         # a second turn, no new image
    wait(browser, lambda d: len(answers(d)) == 2)
    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#log > *") == []


def test_a_bad_image_shows_the_servers_error_and_keeps_the_question(server, browser, tmp_path):
    browser.get(server.url + "/")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a picture")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pending img")) == 1)
    ask(browser, "What is this?")
    error = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))[0]
    assert "cannot load image" in error.text
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "What is this?"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#pending img")) == 1
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user") == []
