"""Browser helpers for UI tests: Debian's Chromium under Selenium, logging in to the Airflow UI,
screenshots saved as test artifacts.

Nothing is downloaded: the browser is ``/usr/bin/chromium`` and the driver ``/usr/bin/chromedriver``
(Debian packages ``chromium`` and ``chromium-driver``, installed by ``.ci/run``), and Selenium
Manager is kept offline.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from trainflow.tasks.settings import PROJECT_DIR

WINDOW_SIZE = (1440, 900)
"""Fixed window size: screenshots and layouts are the same on every machine."""
DEFAULT_WAIT = 60.0
"""Seconds to wait for an element: the UI's first load is slow on a busy 2-core machine."""


def chromium_paths() -> tuple[str | None, str | None]:
    """(browser, driver) executables: ``TRAINFLOW_CHROMIUM`` / ``TRAINFLOW_CHROMEDRIVER`` or Debian's."""
    browser = os.environ.get("TRAINFLOW_CHROMIUM") or shutil.which("chromium")
    driver = os.environ.get("TRAINFLOW_CHROMEDRIVER") or shutil.which("chromedriver")
    return browser, driver


def browser_unavailable() -> str | None:
    """Why no browser test can run here, or ``None``."""
    browser, driver = chromium_paths()
    missing = [name for name, path in (("chromium", browser), ("chromium-driver", driver)) if not path]
    if missing:
        return f"Debian package(s) {', '.join(missing)} not installed (`.ci/run` installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def start_chromium(width: int = WINDOW_SIZE[0], height: int = WINDOW_SIZE[1]):
    """A headless Chromium WebDriver with a fixed window size."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Selenium Manager only runs when a path is missing; keep it offline and quiet regardless.
    os.environ.setdefault("SE_OFFLINE", "true")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new", f"--window-size={width},{height}", "--no-sandbox", "--disable-dev-shm-usage",
        "--disable-gpu", "--no-first-run", "--disable-extensions", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--metrics-recording-only", "--lang=en-US",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    chrome.set_window_size(width, height)
    chrome.set_page_load_timeout(120)
    return chrome


def artifacts_dir() -> Path:
    """``TRAINFLOW_TEST_ARTIFACTS`` or ``<checkout>/test-artifacts`` (gitignored); created."""
    folder = Path(os.environ.get("TRAINFLOW_TEST_ARTIFACTS") or PROJECT_DIR / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_screenshot(driver, name: str, folder: Path | None = None) -> Path:
    """Save the current page as ``<artifacts>/<name>.png``; returns the path."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")
    path = (folder or artifacts_dir()) / f"{safe}.png"
    driver.save_screenshot(str(path))
    return path


def wait(driver, timeout: float = DEFAULT_WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.5)


def wait_visible(driver, by: str, selector: str, timeout: float = DEFAULT_WAIT) -> Any:
    """The first visible element matching (``By.*``, selector); a TimeoutException names the selector."""
    from selenium.webdriver.support import expected_conditions as ec

    return wait(driver, timeout).until(ec.visibility_of_element_located((by, selector)),
                                       f"no visible element {by}={selector!r} on {driver.current_url}")


def wait_text(driver, text: str, timeout: float = DEFAULT_WAIT) -> None:
    """Wait until ``text`` appears in the page's visible text."""
    from selenium.webdriver.common.by import By

    wait(driver, timeout).until(lambda d: text in d.find_element(By.TAG_NAME, "body").text,
                                f"text {text!r} never appeared on {driver.current_url}")


def login_airflow(driver, stack, next_path: str = "/") -> None:
    """Log in through the Airflow UI's login form (simple auth manager) as the stack's admin.

    Args:
        driver: The Selenium WebDriver.
        stack: A :class:`tests.integration.live_stack.LiveStack` (its ``airflow_url``,
            ``username`` and ``password``).
        next_path: The page to open after logging in.
    """
    from selenium.webdriver.common.by import By

    driver.get(f"{stack.airflow_url}/auth/login")
    username = wait_visible(driver, By.CSS_SELECTOR, "input[name='username']")
    username.clear()
    username.send_keys(stack.username)
    password = driver.find_element(By.CSS_SELECTOR, "input[name='password']")
    password.clear()
    password.send_keys(stack.password)
    driver.find_element(By.CSS_SELECTOR, "button[type='submit']").click()
    # The login page sets the JWT cookie and redirects to the UI.
    wait(driver).until(lambda d: "/auth/login" not in d.current_url,
                       f"still on the login page after submitting: {driver.current_url}")
    if next_path and next_path != "/":
        driver.get(f"{stack.airflow_url}{next_path}")
