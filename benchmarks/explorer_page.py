"""The explorer page's size and time to interactive in headless Chromium. The targets (issue "An explorer
for every run"): a page for 1,209 examples x 3 sites x 32 layers (config/paper.yaml's runs) stays under
10 MB and becomes interactive within a second.

    python benchmarks/explorer_page.py                                  # a paper-sized made-up run's page
    python benchmarks/explorer_page.py results/default/explorer.html    # and pages already written
    python benchmarks/explorer_page.py --loads 9 --keep                 # more loads; keep the made-up page

The paper-sized run is patchmap.explorer_demo.paper_sized_run(): made-up numbers at full float32
precision, known_1000-like prompts, top 5 tokens from a 32,000-token vocabulary. Time to interactive is
performance.now() when the page sets window.explorerReady (plotly.js and the data unpacked, the heatmap and
the line drawn, clicks handled), counted from the navigation's start; each load is a fresh headless
Chromium (a new profile, so nothing is cached), whose own start is not counted. The table gives the median
over the loads with the range, and when plotly.js had been evaluated (the page's performance mark
explorer-plotly-loaded), most of the time. Needs chromium and chromedriver (Debian: apt-get install
chromium chromium-driver) and selenium.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from cli import positive


from patchmap.explorer import PLOTLY_JS, explorer_html
from patchmap.explorer_demo import paper_sized_run

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1200"]


# plotly.js alone, inline as a plain script, drawing one 3 x 32 heatmap: what any page drawn with it pays
PLOTLY_ALONE = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><div id="heatmap"></div>
<script>{plotly}</script><script>performance.mark("explorer-plotly-loaded");
Plotly.newPlot("heatmap", [{{type: "heatmap", z: [...Array(3)].map(() => [...Array(32).keys()])}}])
  .then(() => {{ window.explorerReady = performance.now(); }});</script></body></html>"""


def one_load(page):
    """(ms to window.explorerReady, ms to plotly.js evaluated) of one load in a fresh headless Chromium."""
    profile = tempfile.mkdtemp(prefix="patchmap-bench-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(Path(page).resolve().as_uri())
        deadline = time.monotonic() + 60
        while not (ready := driver.execute_script("return window.explorerReady")):
            if time.monotonic() > deadline:
                status = driver.execute_script("return document.getElementById('status').textContent")
                raise SystemExit(f"{page}: not interactive after 60 s: {status}")
            time.sleep(0.05)
        plotly = driver.execute_script(
            "return performance.getEntriesByName('explorer-plotly-loaded')[0].startTime")
        return ready, plotly
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def measure(page, loads):
    times = [one_load(page) for _ in range(loads)]
    ready = [t[0] for t in times]
    return {"MB": Path(page).stat().st_size / 1e6, "ready": statistics.median(ready), "low": min(ready),
            "high": max(ready), "plotly": statistics.median(t[1] for t in times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", nargs="*", help="explorer.html files already written (e.g. the default run's)")
    parser.add_argument("--loads", type=positive, default=5, help="loads per page (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the paper-sized page and say where it is")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="patchmap-explorer-bench-"))
    paper = folder / "paper-sized.html"
    started = time.perf_counter()
    paper.write_text(explorer_html(*paper_sized_run()), encoding="utf-8")
    print(f"wrote the paper-sized page (1,209 examples x 3 sites x 32 layers) in {time.perf_counter() - started:.1f} s")
    alone = folder / "plotly-alone.html"
    alone.write_text(PLOTLY_ALONE.format(plotly=PLOTLY_JS.read_text(encoding="utf-8")), encoding="utf-8")
    rows = [("paper-sized, made up (1209 x 3 x 32)", measure(paper, args.loads))]
    rows += [(page, measure(page, args.loads)) for page in args.pages]
    rows.append(("plotly.js alone, one heatmap", measure(alone, args.loads)))
    print(f"\n{'page':40s} {'size MB':>8s} {'interactive ms, median (range)':>32s} {'plotly.js evaluated ms':>23s}")
    for name, m in rows:
        interactive = f"{m['ready']:.0f} ({m['low']:.0f}-{m['high']:.0f})"
        print(f"{name:40s} {m['MB']:8.2f} {interactive:>32s} {m['plotly']:23.0f}")
    print(f"\n{args.loads} loads each, each in a fresh headless Chromium; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    if args.keep:
        print(f"kept {paper}")
    else:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
