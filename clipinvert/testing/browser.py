"""A headless Chromium for the page of ``clipinvert serve``: its browser tests and the docs'
screenshots (docs/screenshots.py) drive the same one.

Debian's ``chromium`` and ``chromium-driver`` packages (.ci/run installs them), named
explicitly, so Selenium Manager never tries to download a browser or a driver (the machines
this runs on are offline).  The flags are what a container without a display, a GPU or a
sandbox needs, and they keep Chromium itself from calling home.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MISSING = (f"{CHROMIUM} and {CHROMEDRIVER} are needed: .ci/run installs them (apt-get install "
           "chromium chromium-driver); CLIPINVERT_NO_BROWSER=1 skips the browser tests")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars")


def available() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists()


def _short_temp() -> str:
    """Where the profile goes: the system's temporary folder, unless its path is so long that
    Chromium's socket below the profile (``<profile>/org.chromium.Chromium.XXXXXX/
    SingletonSocket``) would pass the 107 bytes a Unix socket path may have: Chromium then
    exits at start-up ("Socket path too long"; a nested TMPDIR such as a test session's under
    pytest-xdist, or macOS's ``/var/folders/...``)."""
    here = tempfile.gettempdir()
    if len(here) <= 30 or not os.access("/tmp", os.W_OK):
        return here
    return "/tmp"


def chromium(width: int = 1400, height: int = 1000) -> Any:
    """A Selenium driver of headless Chromium with its own throw-away profile, logging every
    network request (``driver.get_log("performance")``); :func:`quit` removes the profile."""
    if not available():
        raise RuntimeError(MISSING)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="clipinvert-chromium-", dir=_short_temp())
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    try:
        # Chromium's own temporary files (its single-instance socket) inside the profile
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER),
                                                  env={**os.environ, "TMPDIR": profile}),
                                  options=options)
    except BaseException:
        shutil.rmtree(profile, ignore_errors=True)
        raise
    driver.clipinvert_profile = profile
    return driver


def quit(driver: Any) -> None:  # noqa: A001 - the driver's own word
    driver.quit()
    shutil.rmtree(getattr(driver, "clipinvert_profile", ""), ignore_errors=True)
