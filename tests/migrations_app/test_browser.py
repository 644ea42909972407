"""The admin in a real browser: headless Chromium, driven by Selenium, against a real server,
with real gateways, a real worker and simulated stations behind it.

Needs the Debian packages chromium and chromium-driver, and selenium (the dev extra); the
test skips, saying which is missing, when one is not installed.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from migrations_app.models import MigrationBatch, StationMigration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path("/tmp/batch-page.png")
WAIT = 15


@pytest.fixture
def browser(tmp_path) -> Iterator[object]:
    """Headless Chromium, with a fresh profile, that downloads nothing."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed (apt-get install -y chromium chromium-driver)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium not installed (pip install selenium, or the project's dev extra)")

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1440,1000",
    ):
        options.add_argument(argument)
    # A driver path given to the Service keeps Selenium Manager (a download) out of it.
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_an_operator_migrates_stations_from_the_admin_and_watches_the_batch_finish(
    browser, live_server, stack
):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def wait(condition, timeout: float = WAIT):
        return WebDriverWait(
            browser, timeout, ignored_exceptions=(StaleElementReferenceException,)
        ).until(condition)

    def css(selector: str):
        return browser.find_element(By.CSS_SELECTOR, selector)

    User.objects.create_superuser("ops", "ops@example.com", "a-long-test-password")
    specs = [stack.station(f"CP-WEB-{i}") for i in range(1, 4)]
    specs.append(stack.station("CP-WEB-OLD", firmware="4.2.80"))

    # Reboots slow enough that the batch page first shows the batch running.
    with stack.fleet(specs, reboot_delay=3):
        # Log in, landing on the stations list.
        browser.get(f"{live_server.url}/admin/login/?next=/admin/fleet/chargingstation/")
        css("#id_username").send_keys("ops")
        css("#id_password").send_keys("a-long-test-password")
        css("#login-form [type=submit]").click()
        wait(ec.presence_of_element_located((By.ID, "result_list")))

        # Select every station and run the action.
        css("#action-toggle").click()
        Select(css("select[name=action]")).select_by_value("migrate_to_another_csms")
        css("button[name=index]").click()

        # The options: to csms-2, no start rate limit, a short boot timeout.
        wait(ec.presence_of_element_located((By.ID, "migrate-options")))
        Select(css("#id_target")).select_by_visible_text("csms-2")
        for name, value in (("rate_per_minute", "0"), ("boot_timeout_seconds", "60")):
            field = css(f"#id_{name}")
            field.clear()
            field.send_keys(value)
        css("input[name=_preview]").click()

        # The preview: three to migrate, one skipped for its firmware.
        wait(ec.presence_of_element_located((By.ID, "migrate-preview")))
        tile = "#migrate-preview [data-count={}] .mig-tile-n"
        assert css(tile.format("ready")).text == "3"
        assert css(tile.format("firmware")).text == "1"
        assert "4.2.80 is older than 4.2.85" in css("#firmware-skips").text
        css("input[name=_confirm]").click()

        # The batch page, refreshing itself until the batch is finished.
        wait(ec.presence_of_element_located((By.ID, "mig-summary")))
        batch = MigrationBatch.objects.get()
        assert browser.current_url.endswith(f"/migrationbatch/{batch.id}/change/")
        assert css("#mig-summary").get_attribute("data-batch-state") == "running"
        # Gone if the page reloads: what follows must come from the page updating itself.
        browser.execute_script("window.stillTheSamePage = true")
        wait(
            lambda driver: (
                driver.find_element(By.ID, "mig-summary").get_attribute("data-batch-state")
                == "finished"
            ),
            timeout=120,
        )
        wait(lambda driver: css(".mig-live-indicator").text.startswith("final"))
        assert css("#batch-state").text == "finished"
        assert css(".mig-tile-done .mig-tile-n").text == "3"
        assert css(".mig-tile-skipped .mig-tile-n").text == "1"
        assert css(".mig-percent").text == "100%"
        assert browser.execute_script("return window.stillTheSamePage") is True

        _screenshot(browser)

        # The front page: the three migrated stations connected on csms-2, no batch left
        # running, no failure.
        browser.get(f"{live_server.url}/admin/")
        wait(ec.presence_of_element_located((By.ID, "fleet-overview")))
        wait(
            lambda driver: (
                driver.find_element(
                    By.CSS_SELECTOR, '#overview-csms [data-csms="csms-2"] [data-count=connected]'
                ).text
                == "3"
            )
        )
        assert "None running or paused." in css("#overview-batches").text
        assert "No station failed." in css("#overview-failures").text

    states = sorted(batch.stations.values_list("station__identity", "state"))
    assert states == [
        ("CP-WEB-1", StationMigration.State.DONE),
        ("CP-WEB-2", StationMigration.State.DONE),
        ("CP-WEB-3", StationMigration.State.DONE),
        ("CP-WEB-OLD", StationMigration.State.SKIPPED),
    ]
    assert batch.actions.get().user.username == "ops"


def _screenshot(browser) -> None:
    """The whole page, not just the window (headless windows stop at the screen's size)."""
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1440, "height": int(height), "deviceScaleFactor": 1, "mobile": False},
    )
    browser.save_screenshot(str(SCREENSHOT))
