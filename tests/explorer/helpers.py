"""Helpers shared by the explorer tests and the benchmark: start a real Streamlit server, launch Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "explorer" / "app.py"
CHROMIUM = os.environ.get("FEATUREGEOM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@contextmanager
def streamlit_server(
    cache: Path | str,
    reviews: Path | str | None = None,
    log_dir: Path | None = None,
    extra_args: list[str] | None = None,
    timeout: float = 90.0,
    address: str | None = "127.0.0.1",
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """Run `streamlit run explorer/app.py -- --cache DIR` on a free port until the block ends.

    address None leaves the bind address to the config files; cwd (default the repo) is where it starts;
    env adds to the environment. The server is reached on 127.0.0.1 only."""
    port = free_port()
    log_dir = Path(log_dir or REPO / "bench" / "out")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"streamlit-{port}.log"
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port)]
    if address is not None:
        cmd += ["--server.address", address]
    cmd += [
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--",
        "--cache",
        str(cache),
    ]
    if reviews is not None:
        cmd += ["--reviews", str(reviews)]
    cmd += extra_args or []
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("FEATUREGEOM_CACHE", "FEATUREGEOM_ALLOW_REMOTE", "STREAMLIT_SERVER_ADDRESS"):
        full_env.pop(name, None)
    full_env.update(env or {})
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd or REPO, stdout=fh, stderr=subprocess.STDOUT, env=full_env)
    url = f"http://127.0.0.1:{port}"
    server = Server(url=url, proc=proc, log=log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"streamlit did not become healthy in {timeout:.0f}s:\n{server.log_tail()}"
                )
            time.sleep(0.25)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def launch_chromium(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def wait_for_app(page: Any, timeout: float = 60000) -> None:
    """Wait until Streamlit has finished the current script run (no 'running' status widget) and has drawn
    its elements (no skeleton left: 'notRunning' comes while they are still placeholders)."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout)
    page.wait_for_function(
        """() => {
            const app = document.querySelector('[data-testid="stApp"]');
            return !!app && app.getAttribute('data-test-script-state') === 'notRunning'
                && !document.querySelector('[data-testid="stSkeleton"]');
        }""",
        timeout=timeout,
    )


def download(page: Any, button: str, path: Path, attempts: int = 3) -> Path:
    """Click a download button and save the file. A click that lands while Streamlit is redrawing (e.g.
    during a `run_every` fragment refresh on a loaded machine) can be lost; the button is clicked again
    after the app is idle, so the test checks the export, not the timing of one click."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    for attempt in range(attempts):
        wait_for_app(page)
        target = page.get_by_role("button", name=button)
        # a deferred download (callable data) keeps its button disabled until the server has produced the
        # file of the previous click; on a loaded machine that takes a while, and the file still has to come
        expect(target).to_be_enabled(timeout=120000)
        try:
            with page.expect_download(timeout=60000) as dl:
                target.click()
            dl.value.save_as(path)
            return path
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def write_damaged_reviews(
    path: Path,
    verdicts: list[tuple[int, int, str, str]] | None = None,
    cache: str = "synth",
    table: str = "verdict_history",
    filler: int = 300,
) -> Path:
    """A real review database holding `verdicts` (task, harmful, verdict, reviewer) and `filler` more, whose
    `table` pages are then overwritten with junk (the header and the other tables intact)."""
    import sqlite3

    from explorer.reviews import VERDICTS, ReviewStore

    store = ReviewStore(path)
    for t, h, verdict, reviewer in verdicts or []:
        store.record(t, h, verdict, reviewer, "before the damage", cache=cache)
    for i in range(filler):
        store.record(100000 + i, 1, VERDICTS[i % 3], f"filler-{i % 4}", "a long note " * 30, cache=cache)
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into the main file
        pages = [p for (p,) in con.execute("SELECT pageno FROM dbstat WHERE name = ?", (table,)) if p > 1]
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
    assert pages, f"no pages of {table}"
    data = bytearray(path.read_bytes())
    for p in pages:
        data[(p - 1) * page_size : p * page_size] = bytes([0xA5]) * page_size
    path.write_bytes(bytes(data))
    return path
