"""``clipinvert serve``'s page in a real headless browser (Debian's chromium + chromedriver,
which .ci/run installs), against the tiny random-weight domain: upload, type, run, and the
result read back equals ``clipinvert edit``'s PNG; a non-image upload is a message and the
next request works; two browser sessions at once are one batch and both get their results;
nothing the page loads comes from anywhere but this machine.

No browser is a failure that says how to get one, not a silent skip; CLIPINVERT_NO_BROWSER=1
skips these tests on purpose.  One server for the module (a background thread), one browser
for most tests.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image
from torchrun_helpers import free_port

from clipinvert.cli import main
from clipinvert.testing import browser as browser_tools

TIMEOUT = 60  # seconds for anything the page waits for (a busy 2-core CI machine)

pytestmark = pytest.mark.skipif(os.environ.get("CLIPINVERT_NO_BROWSER", "") not in ("", "0"),
                                reason="CLIPINVERT_NO_BROWSER is set: the browser tests of "
                                       "`clipinvert serve` are skipped on purpose")


@pytest.fixture(scope="module")
def server(tiny_models: Path):
    """The page over the tiny domain, served from a background thread of this process."""
    from clipinvert import Editor
    from clipinvert.serve.app import Service
    from clipinvert.serve.ui import gradio_temp_dir, launch

    with mock.patch.dict(os.environ):  # launch() sets gradio's variables: put back after
        service = Service(Editor("tiny", models=tiny_models, device="cpu"), models=tiny_models)
        demo, url = launch(service, port=free_port())
        assert urllib.parse.urlsplit(url).hostname == "127.0.0.1"
        yield url, service
        demo.close(verbose=False)
        service.close()
    assert not service.root.exists()  # requests and results: all gone
    assert not [p for p in gradio_temp_dir().rglob("*") if p.is_file()]  # and the page's uploads


def new_browser():
    """Headless chromium from Debian's packages (nothing downloaded): a failure that says how
    to get it when it is not installed."""
    if not browser_tools.available():
        pytest.fail(f"browser tests of `clipinvert serve`: {browser_tools.MISSING}")
    return browser_tools.chromium()


def close_browser(driver) -> None:
    browser_tools.quit(driver)


@pytest.fixture(scope="module")
def browser():
    driver = new_browser()
    yield driver
    close_browser(driver)


@pytest.fixture(scope="module")
def photo(tmp_path_factory, face_crop: Image.Image) -> Path:
    path = tmp_path_factory.mktemp("serve-browser") / "astronaut.png"
    face_crop.resize((64, 64)).save(path)
    return path


def wait(driver, condition, timeout: float = TIMEOUT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait(driver, lambda d: css(d, "#photo input[type=file]") and css(d, "#prompts textarea"))


def submit(driver, photo: Path, prompt: str) -> None:
    """Upload ``photo``, type ``prompt``, press Edit (the page as a person uses it)."""
    css(driver, "#photo input[type=file]")[0].send_keys(str(photo))
    wait(driver, lambda d: css(d, "#photo img"))  # uploaded: the preview shows
    box = css(driver, "#prompts textarea")[0]
    box.clear()
    box.send_keys(prompt)
    css(driver, "#run")[0].click()


def result_links(driver) -> list[str]:
    """The downloadable results (the input | inversion | edits strip is listed last)."""
    return [a.get_attribute("href") for a in css(driver, "#downloads a")
            if a.get_attribute("href")
            and not a.get_attribute("href").endswith("-input-inversion-edits.png")]


def fetch(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:  # noqa: S310 - 127.0.0.1
        data = response.read()
    from io import BytesIO

    with Image.open(BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def requested_urls(driver) -> set[str]:
    """Every URL the page asked for since the last call (Chrome's performance log)."""
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            params = message["params"]
            urls.add(params["request"]["url"] if "request" in params else params["url"])
    return urls


def cli_png(photo: Path, prompt: str, models: Path, out: Path) -> np.ndarray:
    assert main(["edit", str(photo), prompt, "-o", str(out), "--models", str(models),
                 "--domain", "tiny", "--device", "cpu", "--quiet"]) == 0
    with Image.open(out / f"{photo.stem}.png") as im:
        return np.asarray(im.convert("RGB"))


def test_a_photo_and_a_prompt_give_the_cli_pixels_and_nothing_leaves_the_machine(
        server, browser, photo: Path, tiny_models: Path, tmp_path: Path, capsys) -> None:
    url, _ = server
    open_page(browser, url)
    assert "domain tiny" in css(browser, "#model textarea")[0].get_attribute("value")
    submit(browser, photo, "she has wavy blond hair")
    wait(browser, lambda d: result_links(d))
    [link] = result_links(browser)
    assert link.endswith("astronaut-she-has-wavy-blond-hair.png")
    expected = cli_png(photo, "she has wavy blond hair", tiny_models, tmp_path / "cli")
    capsys.readouterr()
    assert np.array_equal(fetch(link), expected)
    shown = [img.get_attribute("src") for img in css(browser, "#results img")]
    assert shown and np.array_equal(fetch(shown[0]), expected)  # the gallery shows the same
    [strip] = [img.get_attribute("src") for img in css(browser, "#strips img")]
    assert fetch(strip).shape[1] == 3 * 32  # input | inversion | the edit
    assert "clipinvert edit astronaut.png" in css(browser, "#notes textarea")[0].get_attribute(
        "value")
    web = {u for u in requested_urls(browser) if u.split(":", 1)[0] in ("http", "https", "ws",
                                                                          "wss")}
    assert web, "the performance log recorded no requests"
    away = sorted(u for u in web if urllib.parse.urlsplit(u).hostname not in ("127.0.0.1",
                                                                              "localhost"))
    assert not away, f"the page fetched from elsewhere: {away[:5]}"


def test_a_non_image_upload_is_a_message_and_the_next_request_works(
        server, browser, photo: Path, tmp_path: Path) -> None:
    url, _ = server
    fake = tmp_path / "holiday.png"
    fake.write_text("this is a text file, not a photo\n")
    open_page(browser, url)
    css(browser, "#photo input[type=file]")[0].send_keys(str(fake))
    box = css(browser, "#prompts textarea")[0]
    box.send_keys("he has a beard")
    time.sleep(0.3)  # the upload settles
    css(browser, "#run")[0].click()
    wait(browser, lambda d: "not an image file (contents are text)" in d.find_element(
        "tag name", "body").text)
    assert "holiday.png" in browser.find_element("tag name", "body").text
    assert not result_links(browser)
    open_page(browser, url)  # the server lives: a new request on a fresh page
    submit(browser, photo, "he has a beard")
    wait(browser, lambda d: result_links(d))
    assert result_links(browser)[0].endswith("astronaut-he-has-a-beard.png")


def test_two_browser_sessions_at_once_are_one_batch_and_both_get_their_results(
        server, browser, photo: Path, tiny_models: Path, tmp_path: Path, capsys) -> None:
    """Two users' requests that wait for the model together run as one batch (the model is
    held busy until both are with the service, so that no timing decides it), and each gets
    its own result within a grey level of the CLI's (docs/serve.md#several-users)."""
    url, service = server
    other = new_browser()
    try:
        pages = [(browser, "a smiling person"), (other, "a person with grey hair")]
        threads = [threading.Thread(target=open_page, args=(d, url)) for d, _ in pages]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = len(service.batch_sizes)
        with service.hold():
            for driver, prompt in pages:  # both queued before either runs
                submit(driver, photo, prompt)
            wait(browser, lambda _: service.waiting() == 2)
        for driver, prompt in pages:
            wait(driver, lambda d: result_links(d))
            [link] = result_links(driver)
            assert link.endswith(f"astronaut-{prompt.replace(' ', '-')}.png")
            expected = cli_png(photo, prompt, tiny_models, tmp_path / prompt.replace(" ", "-"))
            capsys.readouterr()
            assert np.abs(fetch(link).astype(int) - expected.astype(int)).max() <= 1
        assert list(service.batch_sizes)[batches:] == [2]
    finally:
        close_browser(other)
