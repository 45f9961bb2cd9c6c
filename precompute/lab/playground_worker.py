"""The steering playground's model process: the explorer (which never imports torch) starts it once per
(model, SAE) and sends it JSON lines; it answers each with one JSON line.

    python -m precompute.lab.playground_worker --model smollm2 --sae assets/sae/... [--hook H] [--adapter DIR]

First line out: {"ready": true, "model": ..., "d_sae": ..., "sae_sha256": ..., "model_sha256": ...,
"hook": ..., "load_seconds": ...} or {"error": "..."} (then exit status 2). Then, per request line
(`PlaygroundRequest` fields), `PlaygroundResult.to_json()` or {"error": "..."}: a bad request costs
one error line, never the process. Progress bars and warnings go to stderr, so stdout stays protocol.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from precompute.errors import FeatureGeomError


def _send(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m precompute.lab.playground_worker", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", required=True, help="model spec, as `featuregeom precompute --model`")
    p.add_argument("--sae", required=True, help="SAE directory or file, as `featuregeom precompute --sae`")
    p.add_argument("--hook", default=None, help="hook to steer and read (default: the SAE's own)")
    p.add_argument("--adapter", default=None, help="peft adapter merged into the model (a fine-tuned cache)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    return p


def serve(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    from precompute.lab.playground import PlaygroundRequest, run_playground
    from precompute.model.hooks import resolve_hook
    from precompute.model.load import load_model
    from precompute.sae.registry import load_sae_for_model

    start = time.perf_counter()
    try:
        lm = load_model(args.model, device=args.device, adapter=args.adapter)
        sae, info = load_sae_for_model(
            args.sae,
            d_model=lm.d_model,
            model_name=lm.name,
            device=str(lm.device),
            warn=lambda m: print(f"warning: {m}", file=sys.stderr, flush=True),
        )
        hook_name = args.hook or sae.hook_name
        if not hook_name:
            raise FeatureGeomError("the SAE names no hook; pass --hook")
        hook = resolve_hook(lm.model, hook_name)
    except FeatureGeomError as exc:
        _send(stdout, {"error": str(exc)})
        return 2
    described = lm.describe()
    _send(
        stdout,
        {
            "ready": True,
            "model": lm.name,
            "model_sha256": described.get("sha256"),
            "sae_sha256": info.get("sha256"),
            "d_sae": sae.d_sae,
            "hook": hook.name,
            "load_seconds": time.perf_counter() - start,
        },
    )
    memo: dict[Any, Any] = {}
    for line in stdin:
        if not line.strip():
            continue
        try:
            request = PlaygroundRequest.from_json(json.loads(line), sae.d_sae)
            _send(stdout, run_playground(lm, hook, sae, request, memo).to_json())
        except (FeatureGeomError, json.JSONDecodeError) as exc:
            _send(stdout, {"error": str(exc)})
        except Exception as exc:  # keep serving: one failed generation must not end the playground
            _send(stdout, {"error": f"generation failed: {type(exc).__name__}: {exc}"})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # stdout is the protocol: anything a library prints there (progress bars) goes to stderr instead
    protocol, sys.stdout = sys.stdout, sys.stderr
    try:
        return serve(args, sys.stdin, protocol)
    finally:
        sys.stdout = protocol


if __name__ == "__main__":
    sys.exit(main())
