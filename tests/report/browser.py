"""Open an HTML file in headless Chromium (Debian's ``chromium``) and report what the page did.

Two runs per page, each with a fresh profile directory:

* ``inspect_page`` loads a copy of the page with a probe script put first in ``<head>``. The probe
  records ``console.error`` calls, uncaught errors, failed resource loads and unhandled promise
  rejections, and at ``load`` writes what it saw (images, which of them decoded, resource URLs
  fetched) into the DOM, which ``--dump-dom`` returns. Chromium's own console log (stderr with
  ``--enable-logging``) is returned too.
* ``screenshot`` renders the unmodified page to a PNG.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--no-first-run", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--disable-extensions", "--mute-audio",
]
TIMEOUT_S = 120
PROBE_ID = "__quantkit_probe"
PROBE = """<script>
(function () {
  var errors = [];
  var original = console.error;
  console.error = function () {
    errors.push('console.error: ' + Array.prototype.map.call(arguments, String).join(' '));
    return original.apply(console, arguments);
  };
  window.addEventListener('error', function (e) {
    var t = e.target;
    if (t && t !== window && (t.src || t.href)) {
      errors.push('failed to load ' + String(t.src || t.href).slice(0, 120));
    } else {
      errors.push('uncaught: ' + e.message);
    }
  }, true);
  window.addEventListener('unhandledrejection', function (e) {
    errors.push('unhandled rejection: ' + e.reason);
  });
  window.addEventListener('load', function () {
    var images = Array.prototype.slice.call(document.images);
    var out = document.createElement('pre');
    out.id = '__PROBE_ID__';
    out.textContent = JSON.stringify({
      images: images.length,
      loaded: images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
      sizes: images.map(function (i) { return [i.naturalWidth, i.naturalHeight]; }),
      resources: performance.getEntriesByType('resource').map(function (r) { return r.name; }),
      errors: errors,
      title: document.title,
      viewport: window.innerWidth,
      pageWidth: document.documentElement.scrollWidth,
      scrollBoxes: Array.prototype.map.call(document.querySelectorAll('.scroll'), function (d) {
        return [d.scrollWidth, d.clientWidth];
      })
    });
    document.body.appendChild(out);
  });
})();
</script>""".replace("__PROBE_ID__", PROBE_ID)
_CONSOLE_LINE = re.compile(r":INFO:CONSOLE[^\]]*\]\s*(.*)")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass(frozen=True)
class PageReport:
    images: int
    loaded: int
    sizes: list[list[int]]
    resources: list[str]
    errors: list[str]
    console: list[str]  # messages Chromium logged from the page's console
    title: str
    dom: str
    viewport: int = 0  # window.innerWidth
    page_width: int = 0  # the document's scroll width: > viewport means the page scrolls sideways
    scroll_boxes: tuple[tuple[int, int], ...] = ()  # (content, visible) width of each .scroll box


def _run(chromium: str, args: list[str], timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="quantkit-chromium-") as profile:
        return subprocess.run(
            [chromium, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )


def console_messages(stderr: str) -> list[str]:
    return [m.group(1) for line in stderr.splitlines() if (m := _CONSOLE_LINE.search(line))]


def inspect_page(chromium: str, html: Path, workdir: Path, width: int = 1280,
                 height: int = 1000) -> PageReport:
    """Load ``html`` (a probed copy, in ``workdir``) in a ``width`` x ``height`` window and
    return what the probe saw."""
    text = html.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", text, flags=re.I)
    if head is None:
        raise AssertionError(f"{html} has no <head>")
    probed = workdir / f"probed-{html.name}"
    probed.write_text(text[:head.end()] + PROBE + text[head.end():], encoding="utf-8")
    proc = _run(chromium, ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
                           f"--window-size={width},{height}", "--dump-dom",
                           probed.resolve().as_uri()])
    match = re.search(rf'<pre id="{PROBE_ID}">(.*?)</pre>', proc.stdout, flags=re.S)
    if match is None:
        raise AssertionError(
            f"the page never reached its load event (chromium exit {proc.returncode}): "
            f"{proc.stderr[-2000:]}"
        )
    import html as html_lib

    probe = json.loads(html_lib.unescape(match.group(1)))
    return PageReport(
        images=probe["images"], loaded=probe["loaded"], sizes=probe["sizes"],
        resources=probe["resources"], errors=probe["errors"],
        console=console_messages(proc.stderr), title=probe["title"], dom=proc.stdout,
        viewport=probe["viewport"], page_width=probe["pageWidth"],
        scroll_boxes=tuple((int(a), int(b)) for a, b in probe["scrollBoxes"]),
    )


def screenshot(chromium: str, html: Path, png: Path, width: int = 1280,
               height: int = 2400) -> tuple[Path, list[str]]:
    """Render the unmodified page to ``png``; also return the console messages of that load."""
    proc = _run(chromium, ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
                           f"--window-size={width},{height}", f"--screenshot={png.resolve()}",
                           html.resolve().as_uri()])
    if not png.is_file():
        raise AssertionError(f"chromium wrote no screenshot (exit {proc.returncode}): "
                             f"{proc.stderr[-2000:]}")
    return png, console_messages(proc.stderr)


def blank_stats(png: Path) -> dict[str, float]:
    """How much of a screenshot differs from its most common colour (the page background)."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32).reshape(-1, 3)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    colours, counts = np.unique(packed, return_counts=True)
    top = int(colours[counts.argmax()])
    background = np.array([(top >> 16) & 255, (top >> 8) & 255, top & 255])
    differs = np.abs(rgb - background).sum(axis=1) > 24
    return {"non_background": float(differs.mean()), "colours": float(len(colours))}


def is_blank(png: Path) -> bool:
    """Blank: under 2% of the pixels differ from the background, or fewer than 32 colours."""
    stats = blank_stats(png)
    return stats["non_background"] < 0.02 or stats["colours"] < 32
