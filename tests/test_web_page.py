"""The serve app's web page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium), against
an app that wants an API key: without the key the page shows the 401; with it typed into the page's field,
type a prompt, submit, see the images; a bad request shows the server's message."""

from __future__ import annotations

import secrets

import pytest

from conftest import NEEDS_CHROMIUM
from serve_support import deployed, write_keys

pytestmark = NEEDS_CHROMIUM


KEY = "sk-page-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def keyed_app(serve_torch_app, tmp_path_factory):
    with deployed(serve_torch_app, "page", api_keys_file=write_keys(tmp_path_factory.mktemp("keys") / "keys", KEY)) as app:
        yield app


def test_page_shows_images_after_a_prompt_is_submitted(keyed_app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(keyed_app.url + "/")
    assert "SimpleAR" in browser.title
    assert [o.text for o in Select(browser.find_element(By.ID, "size")).options] == ["32x32", "64x64"]
    browser.find_element(By.ID, "prompt").send_keys("a red circle on a blue background")
    n = browser.find_element(By.ID, "n")
    n.clear()
    n.send_keys("2")
    Select(browser.find_element(By.ID, "size")).select_by_visible_text("64x64")
    browser.find_element(By.ID, "seed").send_keys("5")
    # no key yet: the server's 401 is shown
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 60).until(EC.text_to_be_present_in_element((By.ID, "status"), "Error"))
    assert "401 missing API key" in browser.find_element(By.ID, "status").text
    key = browser.find_element(By.ID, "api_key")
    assert key.is_displayed() and key.get_attribute("type") == "password"
    key.send_keys(KEY)
    browser.find_element(By.ID, "generate").click()

    def loaded_images(driver):
        imgs = driver.find_elements(By.CSS_SELECTOR, "#images img.result")
        done = [i for i in imgs if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)]
        return done if len(done) == 2 else False

    imgs = WebDriverWait(browser, 120).until(loaded_images)
    sizes = [browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", i) for i in imgs]
    assert sizes == [[64, 64], [64, 64]]  # decoded PNGs of the requested size
    assert imgs[0].get_attribute("src").startswith("data:image/png;base64,")
    assert "2 image(s)" in browser.find_element(By.ID, "status").text
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#images figcaption")]
    assert captions == ["seed 5", "seed 6"]

    # a request the server refuses: its message is shown, the images stay
    browser.find_element(By.ID, "top_p").send_keys("1.5")
    browser.execute_script("document.getElementById('top_p').removeAttribute('max')")  # let the browser send it
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 60).until(EC.text_to_be_present_in_element((By.ID, "status"), "Error"))
    status = browser.find_element(By.ID, "status")
    assert "top_p" in status.text and status.get_attribute("class") == "error"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#images img.result")) == 2


def test_eval_report_shows_its_table_bars_and_images(browser, tmp_path):
    """The eval stage's report.html (simplear.evaluation.report) as a person opens it: from the disk, no server."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    from simplear.evaluation.report import write_report
    from simplear.storage import open_store

    paths = {}
    for ck, colour in (("pretrain", (200, 30, 30)), ("grpo", (30, 30, 200))):
        rel = f"images/{ck}/held_out/00000/samples/0000.png"
        (tmp_path / rel).parent.mkdir(parents=True)
        Image.new("RGB", (16, 16), colour).save(tmp_path / rel)
        paths[ck] = [rel]
    agg = lambda m: {"overall": {"mean": m, "se": 0.05, "count": 180},  # noqa: E731
                     "categories": {"circle": {"mean": m / 2, "se": 0.1, "count": 36}},
                     "figures": {"shape_correct": {"mean": m + 0.125, "se": 0.03, "count": 180}}}
    write_report(open_store(tmp_path), "", {"checkpoints": [{"name": "pretrain", "path": "/x/pretrain/final", "size": [64, 64]},
                                            {"name": "grpo", "path": "/x/grpo/final", "size": [96, 96]}],
                            "sets": {"held_out": {"scores": {"shapes": {"pretrain": agg(0.25), "grpo": agg(0.5)}},
                                                  "grids": [{"prompt": "a red circle on a blue background", "images": paths}]}},
                            "notes": ["a note"]})
    browser.get((tmp_path / "report.html").as_uri())
    table = browser.find_element(By.CSS_SELECTOR, "table.scores")
    assert "shapes" in table.text and "0.250" in table.text and "0.500" in table.text and "n=180" in table.text
    rows = [r.text for r in table.find_elements(By.CSS_SELECTOR, "tr")]
    assert rows[2].startswith("shapes: shape_correct") and "0.375" in rows[2] and "0.625" in rows[2]  # a figure of its own
    bars = browser.find_elements(By.CSS_SELECTOR, "table.categories .bar")
    assert [b.size["width"] for b in bars] == [12, 25]  # half of 0.25 and of 0.5, at 100 px for 1
    imgs = browser.find_elements(By.CSS_SELECTOR, "table.grid img")
    assert len(imgs) == 2 and all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) == 16
                                  for i in imgs)
