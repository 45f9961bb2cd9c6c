"""`python -m explorer.serve --cache DIR`: start the explorer on localhost after checking the cache
and the port, so a busy port or a missing cache gives one clear line instead of a stack trace."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

APP = Path(__file__).with_name("app.py")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m explorer.serve", description=__doc__)
    parser.add_argument("--cache", required=True, help="cache directory, or a root holding several caches")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--address", default="localhost", help="bind address (default localhost only)")
    args = parser.parse_args(argv)
    if not Path(args.cache).is_dir():
        print(f"explorer: error: cache {args.cache} not found; build it with `make demo-cache` or "
              "`featuregeom precompute --config ...`", file=sys.stderr)
        return 2
    if not port_free(args.port):
        print(f"explorer: error: port {args.port} is already in use (another explorer?). Stop it, or choose "
              f"another port: `make demo PORT={args.port + 1}`", file=sys.stderr)
        return 2
    print(f"explorer: open http://localhost:{args.port}", flush=True)
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(args.port),
           "--server.address", args.address, "--server.headless", "true", "--", "--cache", args.cache]
    os.execv(sys.executable, cmd)  # exec: the recorded PID is the server's own
    return 0


if __name__ == "__main__":
    sys.exit(main())
