"""The steering playground's client: finds the model and SAE a cache was built with, starts
`precompute.lab.playground_worker` (the explorer never imports torch) and exchanges JSON lines with it.

Why a long-lived process: loading the model takes seconds, a 40-token completion about one; the worker
loads once per (model, SAE) and serves every session of the server. It refuses to steer with weights
other than the cache's: the SAE's (and a GGUF model's) sha256 must equal the manifest's, otherwise the
activations it shows would not be this cache's features.
"""

from __future__ import annotations

import atexit
import json
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOAD_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class WorkerSpec:
    """What the worker loads, resolved from a cache's manifest."""

    model: str
    sae: str
    hook: str | None
    adapter: str | None
    model_sha256: str | None
    sae_sha256: str | None

    def argv(self) -> list[str]:
        out = [
            sys.executable,
            "-m",
            "precompute.lab.playground_worker",
            "--model",
            self.model,
            "--sae",
            self.sae,
        ]
        if self.hook:
            out += ["--hook", self.hook]
        if self.adapter:
            out += ["--adapter", self.adapter]
        return out


def _local(path: str | None, cache_dir: Path) -> Path | None:
    """`path` as it exists here: absolute, or relative to the working directory, the repository or the cache."""
    if not path:
        return None
    p = Path(path).expanduser()
    for candidate in [p] if p.is_absolute() else [Path.cwd() / p, ROOT / p, cache_dir / p]:
        if candidate.exists():
            return candidate
    return None


def worker_spec(manifest: dict[str, Any], cache_dir: Path) -> WorkerSpec | str:
    """The worker's model and SAE for this cache, or the sentence saying why the playground cannot run."""
    model, sae = manifest.get("model") or {}, manifest.get("sae") or {}
    kind, spec = model.get("kind"), model.get("spec")
    if not spec or not sae.get("source"):
        return "the cache's manifest does not name its model and SAE"
    if kind not in ("packaged", "gguf", "local", "hub"):
        return f"this cache was not built by running a model (its model is {kind!r})"
    if kind in ("gguf", "local"):
        found = _local(model.get("path") or spec, cache_dir)
        if found is None:
            return f"the model this cache was built with ({model.get('path') or spec}) is not on this machine"
        spec = str(found)
    source = str(sae["source"])
    if not source.startswith("release:"):
        found = _local(source, cache_dir)
        if found is None:
            return f"the SAE this cache was built with ({source}) is not on this machine"
        source = str(found)
    adapter = model.get("adapter")
    if isinstance(adapter, dict):
        adapter = adapter.get("path")
    if adapter:
        found = _local(str(adapter), cache_dir)
        if found is None:
            return f"the fine-tune adapter this cache was built with ({adapter}) is not on this machine"
        adapter = str(found)
    return WorkerSpec(
        model=str(spec),
        sae=source,
        hook=manifest.get("hook"),
        adapter=adapter or None,
        model_sha256=model.get("sha256") if kind in ("packaged", "gguf") else None,
        sae_sha256=sae.get("sha256"),
    )


class PlaygroundError(RuntimeError):
    """The playground cannot answer; the message is one sentence for the page."""


class SteeringWorker:
    """One worker process; `ask` is serialised (one generation at a time on a small machine)."""

    def __init__(self, spec: WorkerSpec, load_timeout: float = LOAD_TIMEOUT_S):
        self.spec = spec
        self._lock = threading.Lock()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self.proc = subprocess.Popen(
            spec.argv(),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        atexit.register(self.close)
        threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines), daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()
        self.info = self._receive(load_timeout, "loading the model")
        self._check_identity()

    def _pump(self, stream: Any, into: queue.Queue[str | None]) -> None:
        for line in stream:
            into.put(line)
        into.put(None)  # end of stream: the process exited

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr = [*self._stderr[-40:], line.rstrip()]

    def _receive(self, timeout: float, doing: str) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise PlaygroundError(
                f"the model process took more than {timeout:.0f} s {doing} and was stopped"
            ) from None
        if line is None:
            last = next((s for s in reversed(self._stderr) if s.strip()), "no message")
            raise PlaygroundError(f"the model process exited while {doing} ({last})")
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            message = None
        if not isinstance(message, dict):  # something printed to the protocol stream at the C level
            raise PlaygroundError(f"the model process answered {line.strip()[:120]!r}, not a result line")
        if "error" in message:
            raise PlaygroundError(str(message["error"]))
        return message

    def _check_identity(self) -> None:
        for what, want, got in (
            ("SAE", self.spec.sae_sha256, self.info.get("sae_sha256")),
            ("model", self.spec.model_sha256, self.info.get("model_sha256")),
        ):
            if want and got and want != got:
                self.close()
                raise PlaygroundError(
                    f"the {what} found on this machine is not the one this cache was built with "
                    f"(sha256 {str(got)[:12]}… vs {str(want)[:12]}…); its activations would not be this cache's features"
                )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, request: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        """Send one request; the result (PlaygroundResult.to_json) or PlaygroundError."""
        with self._lock:
            if not self.alive:
                raise PlaygroundError("the model process is not running; reload the page to start it again")
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            return self._receive(timeout, "generating")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
