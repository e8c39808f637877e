"""mitmweb in headless Chromium (Debian's `chromium` package): the flow list as a user sees
it, and screenshots. Used by tests/test_mitmweb_ui.py and scripts/screenshots.py."""

import html
import re
import shutil
import subprocess
import urllib.parse

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
_COMMENT_CELL = re.compile(r'<td class="col-comment"[^>]*>(.*?)</td>', re.S)


def mitmweb_page(web_port: int, fragment: str = "/flows", token: str = "") -> str:
    """mitmweb's page URL; `token` for mitmweb 11.1.2+ (its `web_password`)."""
    query = f"?token={urllib.parse.quote(token)}" if token else ""
    return f"http://127.0.0.1:{web_port}/{query}#{fragment}"


def filtered_page(web_port: int, expression: str, token: str = "") -> str:
    """The flow list with `expression` in the search box (how mitmweb keeps it in the URL)."""
    return mitmweb_page(web_port, "/flows?s=" + urllib.parse.quote(expression, safe=""), token)


def _chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--virtual-time-budget=5000", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def dump_dom(url: str, size: str = "1400,900") -> str:
    return _chromium(f"--window-size={size}", "--dump-dom", url).stdout


def listed_comments(dom: str) -> list[str]:
    """The comment column of every row mitmweb shows."""
    return [html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in _COMMENT_CELL.findall(dom)]


def screenshot(url: str, path, size: str = "1400,900") -> None:
    _chromium(f"--window-size={size}", f"--screenshot={path}", url)
