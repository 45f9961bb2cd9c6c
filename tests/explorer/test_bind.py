"""The explorer listens on 127.0.0.1 wherever it is started, and shows nothing over a wider socket
unless that was asked for explicitly (explorer/.streamlit/config.toml, explorer/serve.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from explorer.serve import (
    ENV_ALLOW_REMOTE,
    command,
    exposure_problem,
    is_loopback,
    listening_addresses,
    parse_proc_net_tcp,
    parser,
)
from tests.explorer.helpers import CHROMIUM, REPO, launch_chromium, streamlit_server, wait_for_app

HOSTILE_CONFIG = '[server]\naddress = "0.0.0.0"\n'


def own_non_loopback_addresses() -> list[str]:
    """This machine's own non-loopback IPv4 addresses (`hostname -I`): the only ones a test may connect to."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return []
    return [a for a in out if ":" not in a and not a.startswith("127.")]


@pytest.mark.parametrize(
    "host,expected",
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("unix:///tmp/explorer.sock", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        (None, False),
        ("192.0.2.7", False),
        ("no-such-host.invalid", False),
    ],
)
def test_is_loopback(host: str | None, expected: bool) -> None:
    assert is_loopback(host) is expected


@pytest.mark.skipif(sys.byteorder != "little", reason="the sample table is a little-endian machine's")
def test_parse_proc_net_tcp() -> None:
    v4 = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0 100 0 0 10 0
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1235 1 0 100 0 0 10 0
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 1236 1 0 20 4 30 10 -1
"""
    v6 = """  sl  local_address                         remote_address                        st tx_queue rx_queue
   0: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1
   1: 00000000000000000000000000000000:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2002 1
"""
    assert parse_proc_net_tcp(v4) == [("127.0.0.1", 8080), ("0.0.0.0", 80)]  # the connected row is skipped
    assert parse_proc_net_tcp(v4, inodes={1235}) == [("0.0.0.0", 80)]
    assert parse_proc_net_tcp(v6) == [("::1", 8081), ("::", 8082)]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_listening_addresses_and_exposure_of_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_ALLOW_REMOTE, raising=False)
    assert exposure_problem(None) is None  # no listening socket (as under AppTest): nothing exposed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert ("127.0.0.1", port) in listening_addresses()
        assert exposure_problem(None) is None
    assert all(p != port for _, p in listening_addresses())
    with socket.socket() as s:  # a moment on every interface; nothing is ever accepted
        s.bind(("0.0.0.0", 0))
        s.listen(0)
        port = s.getsockname()[1]
        problem = exposure_problem("0.0.0.0")
        assert (
            problem is not None
            and f"listening on 0.0.0.0:{port}" in problem
            and "FEATUREGEOM_ALLOW_REMOTE" in problem
        )
        monkeypatch.setenv(ENV_ALLOW_REMOTE, "1")
        assert exposure_problem("0.0.0.0") is None


def test_serve_address_is_the_explicit_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_ALLOW_REMOTE, raising=False)
    cmd, env = command(parser().parse_args(["--cache", "c"]))
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1" and ENV_ALLOW_REMOTE not in env
    cmd, env = command(parser().parse_args(["--cache", "c", "--address", "0.0.0.0", "--port", "9000"]))
    assert cmd[cmd.index("--server.address") + 1] == "0.0.0.0" and env[ENV_ALLOW_REMOTE] == "1"
    assert cmd[cmd.index("--server.port") + 1] == "9000" and cmd[-2:] == ["--cache", "c"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_app_binds_loopback_from_another_directory(synth_cache: Path, tmp_path: Path) -> None:
    """`streamlit run /abs/explorer/app.py` from a directory (and a HOME) whose config says 0.0.0.0."""
    cwd, home = tmp_path / "elsewhere", tmp_path / "home"
    for d in (cwd, home):
        (d / ".streamlit").mkdir(parents=True)
        (d / ".streamlit" / "config.toml").write_text(HOSTILE_CONFIG)
    assert REPO not in cwd.parents
    with streamlit_server(
        synth_cache,
        reviews=tmp_path / "r.sqlite",
        log_dir=tmp_path,
        address=None,
        cwd=cwd,
        env={"HOME": str(home)},
    ) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        assert [a for a in listening_addresses(srv.pid) or [] if a[1] == port] == [("127.0.0.1", port)]
        for ip in own_non_loopback_addresses():  # this machine's own address: the port is closed there
            with socket.socket() as s, pytest.raises(ConnectionRefusedError):
                s.settimeout(5)
                s.connect((ip, port))


@pytest.mark.slow
@pytest.mark.browser
def test_explicit_wide_bind_without_opt_in_shows_nothing(synth_cache: Path, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found")
    from playwright.sync_api import expect, sync_playwright

    with (
        streamlit_server(
            synth_cache, reviews=tmp_path / "r.sqlite", log_dir=tmp_path, address="0.0.0.0"
        ) as srv,
        sync_playwright() as p,
    ):
        port = int(srv.url.rsplit(":", 1)[1])
        browser = launch_chromium(p)
        page: Any = browser.new_page()
        for path in ("/", "/overlaps", "/feature?feature=1"):
            page.goto(srv.url + path)  # 127.0.0.1 only
            wait_for_app(page)
            expect(page.get_by_text(f"This explorer is listening on 0.0.0.0:{port}")).to_be_visible()
            assert page.get_by_role("heading", name="Map of features").count() == 0
            assert (
                page.locator(".js-plotly-plot").count() == 0
                and page.locator('[data-testid="stDataFrame"]').count() == 0
            )
        browser.close()
