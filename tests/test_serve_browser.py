"""`rs serve` in a real headless Chromium: the page loads, the slider moves, and what the page shows is what
POST /api/soup answers for the weights it shows.

Needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver) and selenium; `.ci/run`
installs them. Skipped, saying which is missing, where they are absent.
"""

import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("open_clip")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
    pytest.mark.usefixtures("one_thread"),
]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_cases import random_experts_front, running_server  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No sandbox (CI runs as root); no background traffic (the machine has no network to give it).
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1300,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, what: str, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except Exception as err:  # the page's own status says why, if it failed
        status = driver.find_element("id", "status").text
        raise AssertionError(f"timed out waiting for {what}; page status: {status!r}") from err


def _shown(driver, n: int) -> dict:
    import json

    return {
        "weights": json.loads(driver.find_element("id", "weights").get_attribute("data-weights")),
        "outputs": [driver.find_element("id", f"soup-output-{i}").text for i in range(n)],
        "rewards": [driver.find_element("id", f"soup-rewards-{i}").text for i in range(n)],
    }


def test_moving_the_slider_shows_the_soup_the_api_returns(browser, tmp_path_factory):
    import httpx
    from selenium.webdriver.common.keys import Keys

    from rs_lightning.serve import SoupSession
    from rs_lightning.serve.app import create_app

    session = SoupSession.open(random_experts_front(tmp_path_factory.mktemp("browser")), examples=6)
    with running_server(create_app(session)) as url:
        browser.get(url + "/")
        _wait(browser, lambda d: d.find_element("id", "status").get_attribute("data-state") == "ready", "first soup")
        before = _shown(browser, 6)
        assert before["weights"] == [0.5, 0.5]
        # The front is drawn: one trace per kind of point plus the highlight of the nearest evaluated point.
        names = browser.execute_script("return document.getElementById('front').data.map(t => t.name)")
        assert names[:3] == ["rewarded soups", "experts", "chord"] and names[-1] == "nearest to the current soup"
        assert browser.execute_script("return document.getElementById('front').data.at(-1).x.length") == 1

        slider = browser.find_element("id", "lam")
        browser.execute_script("arguments[0].focus()", slider)
        for _ in range(6):  # 0.5 -> 0.8 in steps of 0.05, as a person would with the arrow keys
            slider.send_keys(Keys.ARROW_RIGHT)
        assert browser.find_element("id", "lam-value").text == "0.80"
        _wait(browser, lambda d: d.find_element("id", "status").get_attribute("data-state") == "ready"
              and abs(_shown(d, 6)["weights"][1] - 0.8) < 1e-9, "the soup at lam = 0.8")
        after = _shown(browser, 6)
        answer = httpx.post(f"{url}/api/soup", json={"weights": after["weights"]}, timeout=120).json()

    assert after["outputs"] != before["outputs"] and after["rewards"] != before["rewards"]
    assert after["outputs"] == answer["outputs"]
    for i, text in enumerate(after["rewards"]):
        assert text == ", ".join(f"{name} {answer['rewards'][name][i]:.3f}" for name in ("bleu1", "rouge_l"))
    assert after["weights"] == answer["weights"]
    assert browser.find_element("id", "download").get_attribute("href").endswith(
        "/api/soup.safetensors?weights=" + ",".join(str(w) for w in answer["weights"]))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_the_simplex_picker_soups_three_experts_and_names_are_text(browser, tmp_path_factory):
    import httpx
    from selenium.webdriver.common.action_chains import ActionChains

    from rs_lightning.serve import SoupSession
    from rs_lightning.serve.app import create_app

    names = ("alpha", "<b>beta</b>", "gamma")  # a name is text on the page, never markup
    run = random_experts_front(tmp_path_factory.mktemp("three"), points=3, names=names)
    session = SoupSession.open(run, examples=6)
    with running_server(create_app(session)) as url:
        browser.get(url + "/")
        _wait(browser, lambda d: d.find_element("id", "status").get_attribute("data-state") == "ready", "first soup")
        assert _shown(browser, 6)["weights"] == pytest.approx([1 / 3] * 3)
        headers = [th.text for th in browser.find_elements("css selector", "#examples th")]
        assert "expert <b>beta</b>" in headers
        svg = browser.find_element("id", "simplex")
        # The triangle's vertices are (150, 15), (20, 240), (280, 240) in a 300 x 270 box: a click 40 px below the
        # box's centre lies inside, nearer the two lower corners (gamma and beta) than the top one (alpha).
        ActionChains(browser).move_to_element_with_offset(svg, 0, 40).click().perform()
        _wait(browser, lambda d: d.find_element("id", "status").get_attribute("data-state") == "ready"
              and _shown(d, 6)["weights"][0] < 0.3, "the soup of the clicked point")
        shown = _shown(browser, 6)
        answer = httpx.post(f"{url}/api/soup", json={"weights": shown["weights"]}, timeout=120).json()
    weights = shown["weights"]
    assert all(w >= 0 for w in weights) and sum(weights) == pytest.approx(1.0, abs=1e-9)
    assert all(round(w * 100) == pytest.approx(w * 100, abs=1e-9) for w in weights)  # whole percents
    assert weights[1] == pytest.approx(weights[2], abs=0.02)
    assert shown["outputs"] == answer["outputs"]
