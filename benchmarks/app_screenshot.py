"""The README's app screenshot, remade on the shipped model: the app launched locally on the
embedded model, the default prompt and settings (25 steps, the model's guidance, W8A6 K=16, TFMQ-DM
baseline), Generate, then a full-page screenshot once the three images are in. Offline; needs
Debian's Chromium (`apt-get install -y chromium`) and Playwright.

    python -m benchmarks.app_screenshot --out docs/img/app-compare.png
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/img/app-compare.png")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1850)  # down to the last row of the column tables
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from playwright.sync_api import expect, sync_playwright

    from app.engine import Engine
    from app.testing import launch

    t0 = time.perf_counter()
    demo, url = launch(Engine(default_model="tiny"))
    demo.dgq_engine.model()  # loaded and calibrated before the click
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": a.width, "height": a.height})
            page.set_default_timeout(300_000)
            page.goto(url)
            page.locator("#generate").click()
            for col in ("fp", "baseline", "dgq"):
                img = page.locator(f"#img-{col} img")
                expect(img).to_be_visible(timeout=300_000)
                page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle())
            expect(page.locator("#md-dgq")).to_contain_text("PSNR vs FP", timeout=60_000)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=a.out, full_page=False)
            browser.close()
    finally:
        demo.close()
    print(f"wrote {a.out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
