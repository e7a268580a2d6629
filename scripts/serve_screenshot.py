"""Screenshot of a running `rs serve` page in headless Chromium (the README's docs/serve.png).

    rs serve runs/demo/captioning/rep0/front --port 8765 &
    python scripts/serve_screenshot.py http://127.0.0.1:8765/ docs/serve.png --lam 0.3

Needs selenium and Debian's chromium + chromium-driver. Sets the slider to --lam, waits for that soup, saves.
"""

from __future__ import annotations

import argparse
import json

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--lam", type=float, default=0.3)
    p.add_argument("--size", default="1300,1150", help="window width,height in pixels")
    args = p.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--window-size={args.size}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(args.url)
        ready = lambda d: d.find_element("id", "status").get_attribute("data-state") == "ready"  # noqa: E731
        WebDriverWait(driver, 120).until(ready)
        driver.execute_script("const s = document.getElementById('lam'); s.value = arguments[0];"
                              "s.dispatchEvent(new Event('input'));", args.lam)
        WebDriverWait(driver, 120).until(lambda d: ready(d) and abs(json.loads(
            d.find_element("id", "weights").get_attribute("data-weights"))[1] - args.lam) < 1e-9)
        driver.save_screenshot(args.out)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
