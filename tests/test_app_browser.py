"""The app in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium, offline).

Types a prompt, moves the A-bits slider, clicks Generate, checks the three images render and the
Attention tab shows per-token maps including `<start>`; screenshots go to test-artifacts/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)", allow_module_level=True)
pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from app.testing import launch  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
TIMEOUT_MS = 150_000


@pytest.fixture(scope="module")
def url():
    demo, url = launch()
    demo.dgq_engine.model()  # the first Generate should not wait for loading + calibration
    yield url
    demo.close()


@pytest.fixture(scope="module")
def page(url):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1700})
        pg.set_default_timeout(TIMEOUT_MS)
        yield pg
        browser.close()


def test_generate_and_attention_tab(url, page):
    expect = playwright.expect
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(url)
    prompt = page.locator("#prompt textarea")
    prompt.fill("a red circle to the left of a blue square")
    steps = page.locator("#steps input[data-testid='number-input']")
    steps.fill("4")
    steps.press("Enter")
    a_bits = page.locator("#a-bits input[type='range']")
    a_bits.focus()
    a_bits.press("ArrowRight")  # 6 → 7
    expect(page.locator("#a-bits input[data-testid='number-input']")).to_have_value("7")
    page.locator("#generate").click()

    for col in ("fp", "baseline", "dgq"):
        img = page.locator(f"#img-{col} img")
        expect(img).to_be_visible(timeout=TIMEOUT_MS)
        page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle())
    expect(page.locator("#md-dgq")).to_contain_text("DGQ W8A7 K=16")
    expect(page.locator("#md-baseline")).to_contain_text("TFMQ-DM W8A7")
    expect(page.locator("#md-fp")).to_contain_text("PSNR vs FP")
    page.screenshot(path=str(ARTIFACTS / "app-compare.png"), full_page=True)

    page.get_by_role("tab", name="Attention").click()
    gallery = page.locator("#att-gallery")
    expect(gallery.locator("img").first).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#att-info")).to_contain_text("<start>")
    expect(gallery).to_contain_text("<start>")
    assert gallery.locator("img").count() >= 3
    expect(page.locator("#att-mass img, #att-mass svg").first).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "app-attention.png"), full_page=True)
