"""`python -m explorer.serve --cache DIR`: start the explorer on 127.0.0.1 after checking the cache
and the port, so a busy port or a missing cache gives one clear line instead of a stack trace.

Where the server listens: `explorer/.streamlit/config.toml` sits beside app.py, and Streamlit
(checked with 1.67) reads that script-level file after the global ~/.streamlit/config.toml and the
one in the current directory, so `streamlit run /any/path/explorer/app.py` binds 127.0.0.1 from any
directory. Only a command-line flag or STREAMLIT_SERVER_ADDRESS overrides it (or a Streamlit that
ignores the file); app.py then checks the sockets the process really listens on (`exposure_problem`)
and refuses to show anything over a non-loopback one unless FEATUREGEOM_ALLOW_REMOTE=1 — which
`--address HOST` sets, the documented way to serve other machines on purpose.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

APP = Path(__file__).with_name("app.py")
ENV_ALLOW_REMOTE = "FEATUREGEOM_ALLOW_REMOTE"
LOOPBACK = "127.0.0.1"
TCP_LISTEN = "0A"  # socket state in /proc/net/tcp


def port_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def is_loopback_ip(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (::ffff:127.0.0.1)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_loopback(host: str | None) -> bool:
    """Whether a server bound to `host` is reachable only from this machine: every address the name
    resolves to is loopback, or it is a unix socket. None / '' (Streamlit's default) means every interface."""
    if host is None or not host.strip():
        return False
    host = host.strip()
    if host.startswith("unix://"):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host.strip("[]"), None)}
    except OSError:
        return False
    return bool(addresses) and all(is_loopback_ip(str(a)) for a in addresses)


def _decode_proc_address(hex_address: str) -> str:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host byte order, in hex."""
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def parse_proc_net_tcp(text: str, inodes: set[int] | None = None) -> list[tuple[str, int]]:
    """(address, port) of the listening sockets in a /proc/net/tcp or tcp6 table (of `inodes` only, when given)."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != TCP_LISTEN:
            continue
        if inodes is not None and int(fields[9]) not in inodes:
            continue
        address, port = fields[1].split(":")
        out.append((_decode_proc_address(address), int(port, 16)))
    return out


def listening_addresses(pid: int | str = "self") -> list[tuple[str, int]] | None:
    """(address, port) of every TCP socket process `pid` listens on, read from /proc; None without /proc."""
    proc = Path("/proc") / str(pid)
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:
        return None
    inodes = set()
    for fd in fds:
        try:
            link = os.readlink(fd)
        except OSError:  # closed meanwhile (e.g. the descriptor that listed the directory)
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[len("socket:[") : -1]))
    found: list[tuple[str, int]] = []
    for table in ("tcp", "tcp6"):
        try:
            found += parse_proc_net_tcp((proc / "net" / table).read_text(), inodes)
        except FileNotFoundError:  # no IPv6 on this machine
            continue
        except OSError:
            return None
    return found


def exposure_problem(configured_address: str | None) -> str | None:
    """Why this server must not show anything (it listens beyond loopback without the opt-in), or None.

    Judged from the sockets the process really listens on (/proc), else from the configured address.
    A process with no listening socket (streamlit's AppTest) exposes nothing.
    """
    if os.environ.get(ENV_ALLOW_REMOTE) == "1":
        return None
    listening = listening_addresses()
    if listening is None:
        exposed = [] if is_loopback(configured_address) else [configured_address or "every interface"]
    else:
        exposed = sorted({f"{a}:{p}" for a, p in listening if not is_loopback_ip(a)})
    if not exposed:
        return None
    return (
        f"**This explorer is listening on {', '.join(exposed)}**, where other machines can reach it, so it shows "
        "nothing. Start it on this machine only with `python -m explorer.serve --cache DIR` (or drop the "
        "`--server.address` flag / `STREAMLIT_SERVER_ADDRESS`). To serve other machines on purpose, use "
        "`python -m explorer.serve --cache DIR --address HOST`, or set `FEATUREGEOM_ALLOW_REMOTE=1`: "
        "anyone who can reach it can then read the cache and save verdicts."
    )


def command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The `streamlit run` command line and its environment for the parsed options."""
    env = dict(os.environ)
    if not is_loopback(args.address):
        env[ENV_ALLOW_REMOTE] = "1"  # --address is the explicit opt-in to serve other machines
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(args.port),
        "--server.address",
        args.address,
        "--server.headless",
        "true",
        "--",
        "--cache",
        args.cache,
    ]
    return cmd, env


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m explorer.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, help="cache directory, or a root holding several caches")
    ap.add_argument("--port", type=int, default=8501)
    ap.add_argument(
        "--address",
        default=LOOPBACK,
        help="bind address (default 127.0.0.1: this machine only). Another address, e.g. 0.0.0.0, "
        "serves every machine that can reach it: anyone there can read the cache and save verdicts",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not Path(args.cache).is_dir():
        print(
            f"explorer: error: cache {args.cache} not found; build it with `make demo-cache` or "
            "`featuregeom precompute --config ...`",
            file=sys.stderr,
        )
        return 2
    if not port_free(args.port):
        print(
            f"explorer: error: port {args.port} is already in use (another explorer?). Stop it, or choose "
            f"another port: `make demo PORT={args.port + 1}`",
            file=sys.stderr,
        )
        return 2
    cmd, env = command(args)
    if not is_loopback(args.address):
        print(
            f"explorer: warning: listening on {args.address}:{args.port} (--address): every machine that can "
            "reach it can read the cache and save verdicts",
            file=sys.stderr,
            flush=True,
        )
    print(f"explorer: open http://{args.address}:{args.port}", flush=True)
    os.execve(sys.executable, cmd, env)  # exec: the recorded PID is the server's own
    return 0


if __name__ == "__main__":
    sys.exit(main())
