"""The morning report opened in headless Chromium (Debian's `chromium` package; `.ci/run` installs it when missing
and running as root): no console message, every image loads, and a screenshot shows each section.

What is checked, precisely: Chromium's console log (`--enable-logging=stderr`: every console message, script
errors included, is an INFO:CONSOLE line) holds nothing; a copy of the page with a checker script appended
reports, once every image has finished, each image's natural size (0 for one that failed to load) and each
section heading's position; a screenshot of the page itself, in the same window, has text (dark pixels) at
every heading's position and inside every gallery image's box the
stored JPEG's pixels (mean absolute difference under 3 gray levels).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from handmade_runs import run_record, write_run
from test_run_report import RUN_ID, known_cases

from fetaliqa.evaluation.run_report import write_run_report

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y "
                                                          "chromium; .ci/run installs it when running as root)")
WINDOW = (1100, 16000)
SECTIONS = ["The run", "Decisions", "Sweep coverage", "Scores and usable frames",
            "Abdominal circumference (research use, not diagnosis)", "Review gallery", "Errors"]

CHECKER = """<script>
const started = Date.now();
function check() {
  const images = [...document.images];
  if (images.some(i => !i.complete) && Date.now() - started < 8000) { setTimeout(check, 50); return; }
  const box = e => { const r = e.getBoundingClientRect();
                     return [Math.round(r.left), Math.round(r.top + scrollY), Math.round(r.width), Math.round(r.height)]; };
  const result = {images: images.map(i => [i.getAttribute('src'), i.naturalWidth, box(i)]),
                  headings: [...document.querySelectorAll('h2')].map(h => [h.textContent, box(h)])};
  const out = document.createElement('pre'); out.id = 'fetaliqa-check'; out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
}
addEventListener('load', check);
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--force-device-scale-factor=1", "--enable-logging=stderr", "--v=0",
                           f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def seg_report(tmp_path_factory):
    """The known run of test_run_report as a SEG run: AC on usable cases, gestational ages for some."""
    root = tmp_path_factory.mktemp("browser")
    cases = [{**c, "ac_mm": 150.0 + 3 * i if c["usable_sweeps"] else None} for i, c in enumerate(known_cases())]
    write_run(str(root / "scores"), run_record(RUN_ID, task="seg"), cases, cases_per_part=20)
    info = root / "info.csv"
    info.write_text("case_id,ga_weeks\n" + "".join(f"{c['case_id']},{20 + i % 15}\n" for i, c in enumerate(cases)))
    write_run_report(str(root / "scores"), str(root / "report"), str(info), gallery_cap=10, sample=8)
    return root / "report"


def test_the_page_loads_every_image_without_console_messages(seg_report):
    page = seg_report / "report.html"
    checked = seg_report / "checked.html"  # beside the page, so that its relative image paths resolve alike
    checked.write_text(page.read_text().replace("</body>", CHECKER + "</body>"))
    done = chromium("--dump-dom", checked.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    result = json.loads(re.search(r'<pre id="fetaliqa-check">(.*?)</pre>', done.stdout, re.S).group(1)
                        .replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    summary = json.loads((seg_report / "summary.json").read_text())
    gallery = [i["image"] for i in summary["gallery"]["items"]]
    assert len(gallery) == 18
    sources = [src for src, _, _ in result["images"]]
    assert set(gallery) <= set(sources) and len(sources) == len(gallery) + 5  # five plots
    broken = [src for src, width, _ in result["images"] if width == 0]
    assert broken == []
    assert [h for h, _ in result["headings"]] == SECTIONS


def test_a_screenshot_shows_every_section_and_the_gallery(seg_report, tmp_path):
    from PIL import Image

    checked = seg_report / "checked.html"
    if not checked.exists():
        checked.write_text((seg_report / "report.html").read_text().replace("</body>", CHECKER + "</body>"))
    layout = chromium("--dump-dom", checked.as_uri()).stdout
    result = json.loads(re.search(r'<pre id="fetaliqa-check">(.*?)</pre>', layout, re.S).group(1)
                        .replace("&quot;", '"').replace("&amp;", "&"))
    shot = tmp_path / "shot.png"
    done = chromium(f"--screenshot={shot}", (seg_report / "report.html").as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    gray = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"))
    assert gray.shape == (WINDOW[1], WINDOW[0])
    for heading, (left, top, width, height) in result["headings"]:
        band = gray[top:top + height, left:left + width]
        assert band.size and (band < 100).mean() > 0.02, f"no text where {heading!r} should be"
    for src, _, (left, top, width, height) in result["images"]:
        if src.startswith("gallery/"):
            shown = gray[top:top + height, left:left + width].astype(np.float64)
            stored = np.asarray(Image.open(seg_report / src).convert("L"), np.float64)
            assert shown.shape == stored.shape == (224, 224)
            assert np.abs(shown - stored).mean() < 3, f"the screenshot does not show {src} where it should be"
