"""The status page in a real browser, over a running federation.

A global and two zones (mutual TLS, the sample zones) run as processes on loopback;
headless Chromium (Debian's chromium and chromium-driver, driven by Selenium) loads
the global's page and does what an operator does: finds a service by name and by
VIP, reads its VIP, and watches a zone go offline when its process stops and come
back when it starts again.  On a failure, a screenshot and the page's DOM are kept
under C{$KUMAZONE_TEST_ARTIFACTS} (default C{/tmp/kumazone-test-artifacts}) and the
failure names them.

Selenium rather than playwright-core: the test stays in Python and pytest (no
node_modules, no second test runner), and it talks to Debian's chromedriver, which
matches Debian's chromium by construction.  Chromium runs with the flags that keep
it from reaching any host (no background networking, component updates or sync)
and a fresh profile.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.fedprocess import GlobalProcess, ProcessGroup, make_certs, start_zone, wait_until
from tests.kzprocess import REPO, ZoneProcess

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)
ARTIFACTS = Path(os.environ.get("KUMAZONE_TEST_ARTIFACTS", "/tmp/kumazone-test-artifacts"))
#: The page polls every REFRESH seconds; a zone's state shows within a few polls.
REFRESH = 0.5
SEEN_WITHIN = 20.0
T = TypeVar("T")


def browser_missing() -> str | None:
    """Why no browser test can run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found: apt-get install {package} (make test installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]' (make test does it)"
    return None


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A global and zone-1, zone-2 serving the sample zones, synced."""
    work = tmp_path_factory.mktemp("status-page")
    certs = make_certs(work / "certs", ["localhost"], ["zone-1", "zone-2"])
    group = ProcessGroup()
    try:
        global_ = group.add(GlobalProcess(work, certs)).start()
        zones = {
            name: start_zone(work, name, global_.address, certs, REPO / "zones" / name, group=group)
            for name in ("zone-1", "zone-2")
        }
        wait_until(
            lambda: (
                all(z["state"] == "online" for z in global_.zones().values())
                and len(global_.zones()) == 2
            ),
            30,
            0.1,
            "both zones online",
        )
        yield {"global": global_, "zones": zones}
    finally:
        group.stop_all()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium under chromedriver, with a fresh profile."""
    why = browser_missing()
    if why is not None:
        pytest.fail(f"the status page test needs a browser: {why}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    service = Service(executable_path=CHROMEDRIVER, log_output=os.devnull)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def evidence(driver: Any, name: str) -> Iterator[None]:
    """On a failure, keep a screenshot and the DOM, and name them in the failure."""
    try:
        yield
    except BaseException as e:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        stem = ARTIFACTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
        try:
            driver.save_screenshot(f"{stem}.png")
            Path(f"{stem}.html").write_text(driver.page_source)
        except Exception as saving:  # the browser itself may be what failed
            raise AssertionError(f"{e}\n(no screenshot: {saving})") from e
        raise AssertionError(f"{e}\nscreenshot: {stem}.png, page: {stem}.html") from e


def seen(what: str, probe: Callable[[], T | None], timeout: float = SEEN_WITHIN) -> T:
    """Poll the page until C{probe} returns something; fail saying what was awaited."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            found = probe()
            if found:
                return found
            last = found
        except WebDriverException as e:  # an element replaced while read: read again
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not show {what} within {timeout:.0f}s ({last!r})")
        time.sleep(0.1)


def zone_state(driver: Any, zone: str) -> str | None:
    """The state the zones table shows for C{zone} (None: no such row)."""
    state = driver.execute_script(
        "const row = document.querySelector(`#zones tr[data-zone='${arguments[0]}']`);"
        "return row && row.querySelector('.state').innerText;",
        zone,
    )
    return None if state is None else str(state)


def vip_rows(driver: Any) -> list[list[str]]:
    """The VIP table as the page shows it: one list of cell texts per row, read at once."""
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('#vips tbody tr'),"
        " (row) => Array.from(row.cells, (cell) => cell.innerText));"
    )
    return [[str(cell) for cell in row] for row in rows]


def shown(driver: Any, element_id: str) -> str:
    """The text of an element as the page shows it (empty when hidden)."""
    return str(
        driver.execute_script(
            "const node = document.getElementById(arguments[0]);"
            "return node.checkVisibility() ? node.innerText : '';",
            element_id,
        )
    )


def search(driver: Any, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "search")
    box.clear()
    box.send_keys(text)


def test_the_global_page_finds_a_service_and_shows_its_vip(federation, browser) -> None:
    global_: GlobalProcess = federation["global"]
    web = next(
        i for i in global_.vips()["items"] if (i["mesh"], i["service"]) == ("default", "web")
    )
    with evidence(browser, "status-page-search"):
        browser.get(f"http://127.0.0.1:{global_.ports['api']}/?refresh={REFRESH}")
        assert seen("the global's name", lambda: browser.title == "kumazone · global")
        seen(
            "both zones online",
            lambda: [zone_state(browser, z) for z in ("zone-1", "zone-2")] == ["online", "online"],
        )
        seen("the whole table", lambda: len(vip_rows(browser)) == len(global_.vips()["items"]))

        search(browser, "web")
        row = seen("only web", lambda: (rows := vip_rows(browser)) and len(rows) == 1 and rows[0])
        assert row[:4] == ["default", "web", web["vip"], web["vip6"]]
        assert "zone-2" in row[5]

        search(browser, web["vip"])  # a VIP finds its service too
        row = seen("web by its VIP", lambda: (r := vip_rows(browser)) and len(r) == 1 and r[0])
        assert row[1] == "web"

        search(browser, "no-such-service")
        seen("that nothing matches", lambda: "No service matches" in shown(browser, "no-vips"))
        assert vip_rows(browser) == []


def test_the_global_page_sees_a_zone_go_and_come_back(federation, browser) -> None:
    global_: GlobalProcess = federation["global"]
    zone: ZoneProcess = federation["zones"]["zone-2"]
    with evidence(browser, "status-page-zone"):
        browser.get(f"http://127.0.0.1:{global_.ports['api']}/?refresh={REFRESH}")
        seen("zone-2 online", lambda: zone_state(browser, "zone-2") == "online")
        zone.stop()
        seen("zone-2 offline", lambda: zone_state(browser, "zone-2") == "offline")
        assert zone_state(browser, "zone-1") == "online"
        assert "1 of 2 online" in shown(browser, "facts")
        zone.start()
        # A zone reconnects at once; the global marks it online at its hello.
        seen("zone-2 online again", lambda: zone_state(browser, "zone-2") == "online", 40)
        seen("2 of 2 zones online", lambda: "2 of 2 online" in shown(browser, "facts"))
        assert shown(browser, "live").startswith("live"), shown(browser, "live")


def test_the_screenshot_on_failure_is_kept(browser, tmp_path: Path, monkeypatch) -> None:
    """What a failure leaves behind is a picture of the page and the page itself."""
    monkeypatch.setattr(f"{__name__}.ARTIFACTS", tmp_path)
    browser.get("about:blank")
    with pytest.raises(AssertionError, match=r"screenshot: .*\.png") as raised:
        with evidence(browser, "deliberate"):
            raise AssertionError("a deliberate failure")
    [picture] = tmp_path.glob("deliberate-*.png")
    assert picture.read_bytes().startswith(b"\x89PNG")
    assert str(picture) in str(raised.value)
