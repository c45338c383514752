"""Each kind of report opened in a real browser (headless Chromium, offline): no console errors, every
image decodes (in the browser and with PIL), the page is not blank, every table has rows.

The reports hold no script. To ask the browser whether its images decoded, the test opens a copy of
the page with a short checking script appended; the screenshot is taken of the report itself and kept
under the test's temporary folder (its path is printed).
"""

import base64
import io
import re
import shutil
import subprocess

import pytest
from PIL import Image

from cli_helpers import run_cli
from run_dirs import make_command_runs

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0).length;
  if (broken) console.error("broken images: " + broken);
  document.body.setAttribute("data-images", images.length);
  document.body.setAttribute("data-broken", broken);
});
</script>"""


def browser() -> str:
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install -y chromium; .ci/run installs it)")
    return found


def chromium(executable, profile, *args, timeout=90):
    command = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=5000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def load_checked(executable, source: str, folder):
    """Open `source` with the checking script appended: (DOM after load, console lines, images, broken)."""
    checked = folder / "checked.html"
    checked.write_text(source.replace("</body>", CHECK + "</body>"))
    loaded = chromium(executable, folder / "profile", "--dump-dom", checked.as_uri())
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    dom = loaded.stdout
    count = int(re.search(r'data-images="(\d+)"', dom).group(1))
    return dom, console_errors(loaded.stderr), count, int(re.search(r'data-broken="(\d+)"', dom).group(1))


@pytest.mark.slow
def test_the_checks_catch_a_broken_image(tmp_path):
    page = '<!doctype html><html><body><p>x</p><img src="data:image/png;base64,AAAA"></body></html>'
    _, errors, images, broken = load_checked(browser(), page, tmp_path)
    assert images == 1 and broken == 1 and any("broken images: 1" in line for line in errors)


@pytest.fixture(scope="module")
def pages(runs, tmp_path_factory):
    """eval, robustness and comparison pages built by `trustseg report`, and the page every other
    command that reports results wrote at its end."""
    out = tmp_path_factory.mktemp("reports")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert run_cli(["report", str(runs["eval0"]), str(runs["eval1"]), str(runs["robustness"]), "--out", str(out)],
                       monkeypatch) == 0
        commands = make_command_runs(tmp_path_factory.mktemp("command-runs"), monkeypatch)
    return {"eval": out / "eval0" / "report.html", "robustness": out / "robustness" / "report.html",
            "comparison": out / "comparison.html", **{name: run / "report.html" for name, run in commands.items()}}


KINDS = ["eval", "robustness", "comparison", "train", "info", "predict", "calibrate", "adapt", "compress", "augment"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_report_renders_in_chromium(pages, kind, tmp_path):
    executable = browser()
    page = pages[kind]
    source = page.read_text()
    assert "<script" not in source  # the report itself runs nothing

    dom, errors, images, broken = load_checked(executable, source, tmp_path)
    assert not errors, errors
    assert images == source.count("<img") and images > 0 and broken == 0
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', dom):
        Image.open(io.BytesIO(base64.b64decode(data))).load()  # PIL decodes them too
    tables = re.findall(r"<table>(.*?)</table>", dom, flags=re.S)
    assert tables and all(table.count("<tr>") >= 2 for table in tables)  # a header and at least one row
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script)>.*?</\1>", " ", dom, flags=re.S))
    assert len(text.split()) > 50

    screenshot = tmp_path / f"{kind}.png"
    shot = chromium(executable, tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1200,1600",
                    page.as_uri())
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    assert not console_errors(shot.stderr), console_errors(shot.stderr)
    colours = Image.open(screenshot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 10  # not blank: text, tables and plots in many colours
    print(f"screenshot of the {kind} report: {screenshot}")
