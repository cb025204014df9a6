"""The HTML comparison report as a person sees it: two real Debian kernels compared,
the page opened in headless Chromium (Debian's package, installed by bin/setup --tests),
measured by the browser's own layout, and kept as a screenshot.

The screenshot and the page stay after the test, at
results/test-artifacts/report-browser/compare.png and compare.html
($HARNESS_TEST_ARTIFACTS instead of results/test-artifacts when set).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

from harness.paths import GUEST_TESTS_DIR, REPO
from tests.conftest import Cli

ARTIFACTS = Path(os.environ.get("HARNESS_TEST_ARTIFACTS") or REPO / "results" / "test-artifacts")
KERNELS = ("debian:linux-image-6.1.0-56-cloud-amd64", "debian:linux-image-6.12-cloud-amd64")
# Without the network flags Chromium keeps trying hosts this machine cannot reach.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1280,1400"]

# A regression to show: the same test passes on 6.1 and fails on 6.12, with a kernel log error.
PLANTED = '''
def test_planted_regression_on_6_12(guest):
    release = guest.check("uname -r").strip()
    if release.startswith("6.12"):
        guest.check("echo '<3>swiotlb buffer is full (sz: 65536 bytes), total 32768 (slots)' > /dev/kmsg")
    assert not release.startswith("6.12"), f"planted failure on {release}"
'''

# Runs in the page, synchronously at the end of the body: what the browser laid out.
PROBE = '''<script>
(() => {
  const box = e => e.getBoundingClientRect();
  const plots = [...document.querySelectorAll("svg")].map(svg => ({
    width: box(svg).width, height: box(svg).height,
    line: svg.querySelector("polyline") ? svg.querySelector("polyline").getTotalLength() : 0,
    points: svg.querySelectorAll("circle").length,
    clipped: [...svg.querySelectorAll("text")].filter(t => {
      const b = t.getBBox(); return b.x < 0 || b.x + b.width > svg.width.baseVal.value; }).map(t => t.textContent),
  }));
  const changes = document.getElementById("changes");
  const fail = document.querySelector("td.fail");
  const out = {
    plots,
    regression_rows: [...document.querySelectorAll("tr.regression td.test")].map(td => td.textContent),
    changes_top: changes ? box(changes).top : null,
    changes_text: changes ? changes.innerText : "",
    fail_colour: fail ? getComputedStyle(fail).backgroundColor : null,
    overflow: document.documentElement.scrollWidth > innerWidth,
  };
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.append(pre);
})();
</script>'''


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed: bin/setup --tests installs Debian's chromium package"
    # Its crash-report folder and caches go to the profile too, not the user's home.
    env = dict(os.environ, XDG_CONFIG_HOME=str(profile / "config"), XDG_CACHE_HOME=str(profile / "cache"))
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, env=env)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_comparison_report_in_a_browser(cli: Cli, tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    shutil.copytree(GUEST_TESTS_DIR, suite)
    (suite / "test_planted.py").write_text(PLANTED)
    for kernel, expected in zip(KERNELS, (0, 1), strict=True):
        proc = cli("run", "--kernel", kernel, "--results", str(cli.results), "--tests", str(suite),
                   "-k", "test_reached_userspace or test_boot_log_is_clean or 4-nvme or planted")
        assert proc.returncode == expected, proc.stdout[-2000:]
    out = ARTIFACTS / "report-browser"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    page = out / "compare.html"
    proc = cli("compare", *map(str, cli.run_dirs()), "--format", "html", "--output", str(page))
    assert proc.returncode == 0, proc.stderr

    shot = out / "compare.png"
    proc = chromium(tmp_path / "profile-shot", f"--screenshot={shot}", page.as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    assert png_size(shot) == (1280, 1400)

    probe_page = tmp_path / "probe.html"
    probe_page.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    proc = chromium(tmp_path / "profile-probe", "--dump-dom", probe_page.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    probe: dict[str, Any] = json.loads(html.unescape(found.group(1)))

    # It renders: boot time and the nvme throughput are plotted, one point per kernel, no label cut off.
    assert len(probe["plots"]) >= 2
    for plot in probe["plots"]:
        assert plot["width"] >= 400 and plot["height"] >= 150 and plot["line"] > 50 and plot["points"] == 2, plot
        assert plot["clipped"] == [], plot
    # Which test regressed, readable at the top of the page without opening anything else.
    test = "test_planted.py::test_planted_regression_on_6_12"
    assert probe["regression_rows"] == [test]
    assert probe["changes_top"] < 200
    assert test in probe["changes_text"] and "1 regression" in probe["changes_text"]
    assert "planted failure on 6.12" in probe["changes_text"] and "swiotlb-full-" in probe["changes_text"]
    assert probe["fail_colour"] == "rgb(255, 153, 153)" and probe["overflow"] is False
