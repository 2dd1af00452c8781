"""Screenshot of a sweep's review page, as in the README (docs/review-sweep.png): the page top, the
paired comparisons and the first side-by-side pair (both videos seeked to the same moment), then the
last job's failure tags and failures by tag. Headless Debian Chromium through Playwright; the PNG is
quantized to 256 colours to stay small.

    python scripts/review_screenshot.py SWEEP_DIR/review.html docs/review-sweep.png [SEEK_PERMILLE]
"""

import sys
import time
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def main(page_path: Path, out: Path, seek: int = 450) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1240, "height": 800})
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        t0 = time.perf_counter()
        page.goto(page_path.resolve().as_uri())
        page.wait_for_load_state("load")
        print(f"loaded in {time.perf_counter() - t0:.2f} s")
        page.evaluate("document.querySelector('img.plot') && document.querySelector('img.plot').remove()")
        pair = page.locator(".pair").first
        pair.scroll_into_view_if_needed()
        pair.locator("input[type=range]").evaluate(f"r => {{ r.value = {seek}; r.dispatchEvent(new Event('input')); }}")
        page.wait_for_timeout(1500)
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(300)
        bottom = page.evaluate("document.querySelector('.pair').getBoundingClientRect().bottom + window.scrollY")
        page.screenshot(path=str(out.with_suffix(".a.png")), full_page=True,
                        clip={"x": 0, "y": 0, "width": 1240, "height": bottom + 10})
        page.evaluate("""() => document.querySelectorAll('.card video').forEach(v => { window.reviewLoad(v);
            v.addEventListener('loadedmetadata', () => { v.currentTime = 0.75 * v.duration; }); })""")
        page.wait_for_timeout(3000)
        top = page.evaluate("[...document.querySelectorAll('h2[id]')].pop().getBoundingClientRect().top + window.scrollY")
        bottom = page.evaluate("[...document.querySelectorAll('section[data-failure]')].pop()"
                               ".getBoundingClientRect().bottom + window.scrollY")
        page.screenshot(path=str(out.with_suffix(".b.png")), full_page=True,
                        clip={"x": 0, "y": top - 10, "width": 1240, "height": min(bottom - top + 20, 1100)})
        browser.close()
    if problems:
        sys.exit(f"the page logged problems: {problems}")
    parts = [Image.open(out.with_suffix(s)).convert("RGB") for s in (".a.png", ".b.png")]
    img = Image.new("RGB", (1240, sum(p.height for p in parts)), "white")
    img.paste(parts[0], (0, 0))
    img.paste(parts[1], (0, parts[0].height))
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    for s in (".a.png", ".b.png"):
        out.with_suffix(s).unlink()
    print(f"{out}: {img.size[0]}x{img.size[1]}, {out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *(int(a) for a in sys.argv[3:4]))
