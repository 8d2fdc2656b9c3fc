"""The HTML report: self-contained (no external resource), with its plots, and it renders in
a real browser (headless Chromium) with every image decoded."""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path

import pytest

from nextbest.offline import notebook as sdk
from nextbest.offline.report import build_report
from tests.synthlog import write_log

CHROMIUM = Path("/usr/bin/chromium")
PNG = b"\x89PNG\r\n\x1a\n"
# Written into the page by the test (the report has no script): how many images decoded.
PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const d = document.createElement("div"); d.id = "probe"; d.textContent = `decoded ${ok} of ${imgs.length}`;
  document.body.appendChild(d);
});</script>"""


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    d = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{d}/log.db"
    write_log(url, n=1500, hours=60)
    return url, d


def test_report_is_self_contained_with_its_plots(page: tuple[str, Path]) -> None:
    url, _ = page
    html = build_report(url, "app_home_banner")
    images = re.findall(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 4  # reward over time, arm shares, learning curve, budget burn
    for data in images:
        assert base64.b64decode(data).startswith(PNG)
    assert not re.search(r'(src|href)\s*=\s*"(?!data:)', html)  # nothing fetched from anywhere
    assert "<script" not in html
    for title in ("Variants", "Reward over time", "Arms", "Learning curve", "Budgets"):
        assert f"<h2>{title}</h2>" in html
    assert "campaign:xmas" in html and "holdout" in html


def _cli(argv: list[str]) -> int:
    from nextbest.cli.main import main

    return main(argv)


def test_report_command_and_sdk_write_the_file(page: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    url, d = page
    out = d / "cli.html"
    assert _cli(["report", "--db", url, "--placement", "app_home_banner", "--out", str(out), "--bucket", "day"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}")
    assert out.read_text().count("data:image/png;base64,") == 4
    text = sdk.report("app_home_banner", db=url, out=d / "sdk.html")
    assert (d / "sdk.html").read_text() == text
    assert _cli(["report", "--db", url, "--placement", "nope", "--out", str(d / "x.html")]) == 1
    assert not (d / "x.html").exists()


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=90)


def test_report_renders_in_headless_chromium(page: tuple[str, Path]) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI has no /usr/bin/chromium: .ci/run installs it with apt-get install chromium")
        pytest.skip("/usr/bin/chromium is missing: apt-get install chromium (.ci/run does it on CI)")
    url, d = page
    html = build_report(url, "app_home_banner")
    probe = d / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    r = _chromium(["--dump-dom", "--virtual-time-budget=5000", probe.as_uri()], d / "profile-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'<div id="probe">decoded (\d+) of (\d+)</div>', r.stdout)
    assert m, r.stdout[-2000:]
    assert m.group(1) == m.group(2) == "4"

    shot = d / "shot.png"
    report = d / "report.html"
    report.write_text(html)
    r = _chromium([f"--screenshot={shot}", "--window-size=1200,2400", "--hide-scrollbars", report.as_uri()], d / "profile-shot")
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (2400, 1200)
    not_white = (pixels[..., :3] < 0.9).any(axis=-1).mean()
    colored = (pixels[..., :3].max(axis=-1) - pixels[..., :3].min(axis=-1) > 0.2).mean()
    assert not_white > 0.03, not_white  # text, tables and plots drawn
    assert colored > 0.005, colored  # the plots' coloured lines and areas, not only text
