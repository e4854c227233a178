"""A page looked at as a person would: Debian's headless Chromium, driven over the DevTools protocol
(PyPI websocket-client), for tests/test_services.py.

Why the protocol and not `chromium --screenshot URL`: the MLflow server asks for a login, and a
`user:password@host` URL loads the page shell but the app's own requests then fail (browsers refuse
credentials in fetch URLs). Over the protocol every request carries an Authorization header, and the
test can read the rendered text and check that images really decoded.
"""
from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from services import HOST, ServiceError, _Process, find_binary, free_ports


class Page:
    """One tab: navigate, wait for text, read the page, save a PNG."""

    def __init__(self, socket_url: str, timeout: float):
        import websocket

        self._socket = websocket.create_connection(socket_url, timeout=timeout, suppress_origin=True)
        self._ids = itertools.count(1)
        self.timeout = timeout

    def call(self, method: str, **params: Any) -> dict:
        message_id = next(self._ids)
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise ServiceError(f"Chromium {method} failed: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)["result"].get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def open(self, url: str, *expected: str) -> str:
        """Load `url` and wait until every string of `expected` is on the page; returns the page's text."""
        self.call("Page.navigate", url=url)
        deadline, text = time.monotonic() + self.timeout, ""
        while time.monotonic() < deadline:
            text = self.text()
            if self.evaluate("document.readyState") == "complete" and all(e in text for e in expected):
                time.sleep(0.5)  # let charts and images finish painting
                return self.text()
            time.sleep(0.3)
        missing = [e for e in expected if e not in text]
        raise AssertionError(f"{url} never showed {missing}; the page said: {text[:300]!r}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self._socket.close()


@contextlib.contextmanager
def chromium(login: tuple[str, str] | None = None, size: tuple[int, int] = (1400, 900), timeout: float = 60) -> Iterator[Page]:
    """A headless Chromium with one page; every request carries HTTP basic auth for `login`."""
    binary = next((b for b in (_maybe("chromium-headless-shell"), _maybe("chromium")) if b), None)
    if binary is None:
        raise ServiceError("no headless Chromium; install it with .ci/install-services (apt chromium-headless-shell)")
    profile = Path(tempfile.mkdtemp(prefix="kip-chromium-"))
    (port,) = free_ports(1)
    argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            f"--user-data-dir={profile}", f"--remote-debugging-address={HOST}", f"--remote-debugging-port={port}",
            f"--window-size={size[0]},{size[1]}", "about:blank"]
    process = _Process("Chromium", argv, profile / "chromium.log")
    page = None
    try:
        def tab() -> str:
            with urllib.request.urlopen(f"http://{HOST}:{port}/json/list", timeout=2) as response:
                return next(t["webSocketDebuggerUrl"] for t in json.load(response) if t["type"] == "page")

        process.wait_until(lambda: bool(tab()), timeout)
        page = Page(tab(), timeout)
        page.call("Network.enable")
        if login:
            token = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
            page.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {token}"})
        page.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1, mobile=False)
        page.call("Page.enable")
        yield page
    finally:
        if page is not None:
            page.close()
        process.stop(grace=5)
        shutil.rmtree(profile, ignore_errors=True)


def _maybe(name: str) -> str | None:
    with contextlib.suppress(ServiceError):
        return find_binary(name)
    return None
