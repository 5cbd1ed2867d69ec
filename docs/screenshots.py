"""Screenshots of ``clipinvert serve`` for the docs, taken in headless Chromium.

    python docs/screenshots.py            # writes docs/images/serve.png and serve-result.png

The page runs over a tiny random-weight domain (clipinvert.testing.models, as the tests use),
so it needs no downloaded weights; its results are noise by design — the screenshots show the
page, not what an edit looks like.  Needs the serve and test extras and Debian's chromium +
chromium-driver (.ci/run installs them).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = "she has wavy blond hair\nhe has a beard and glasses"


def main() -> int:
    scratch = Path(tempfile.mkdtemp(prefix="clipinvert-screenshots-"))
    os.environ["CLIPINVERT_HOME"] = str(scratch / "cache")  # its text cache stays in here
    os.environ["HF_HUB_OFFLINE"] = "1"
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from clipinvert import Editor
    from clipinvert.serve.app import Service
    from clipinvert.serve.ui import launch
    from clipinvert.testing import browser
    from clipinvert.testing.models import write_domain

    toml = write_domain(scratch / "domain", size=64)
    service = Service(Editor("tiny", models=toml, device="cpu"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, url = launch(service, port=port)
    driver = browser.chromium(1400, 1400)
    try:
        wait = WebDriverWait(driver, 60, poll_frequency=0.1)
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
        time.sleep(0.5)  # fonts and layout settle
        driver.save_screenshot(str(HERE / "images" / "serve.png"))
        photo = HERE.parent / "examples" / "astronaut.jpg"
        driver.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(photo))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo img"))
        driver.find_element(By.CSS_SELECTOR, "#prompts textarea").send_keys(PROMPTS)
        driver.find_element(By.CSS_SELECTOR, "#run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#downloads a")) == 3)
        driver.execute_script("window.scrollTo(0, 0)")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#strips img") and d.execute_script(
            "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"))
        time.sleep(0.5)
        driver.save_screenshot(str(HERE / "images" / "serve-result.png"))
    finally:
        browser.quit(driver)
        demo.close(verbose=False)
        service.close()
        shutil.rmtree(scratch, ignore_errors=True)
    for name in ("serve.png", "serve-result.png"):
        print(HERE / "images" / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
