"""JSON-lines worker: lets a process in another environment (e.g. the torch venv) run MegEngine.

Run as `python -m backends.megengine.worker` inside .venv-mge. One JSON object per line on stdin,
one JSON line reply on the ORIGINAL stdout: at start fd 1 is duplicated for the protocol and then
pointed at fd 2, so anything MegEngine (or Python code) prints goes to stderr and cannot corrupt the
channel. Arrays travel as safetensors files (reparam_core.formats.safetensors_io); all paths absolute.

  {"op": "ping"} -> {"ok": true, "megengine": version, "python": version}
  {"op": "predict", "model": NAME|null, "block": block_spec_dict|null, "num_classes": int,
   "form": "train"|"deploy", "state": path, "input": path (key "x"), "output": path,
   "reparameterize": bool, "export_state": path|null, "fastrun": bool (default false)}
     -> {"ok": true, "form": final_form, "seconds": float}; writes {"y": ...} to output
  {"op": "export_traced", "model"/"block"/"num_classes"/"form", "state", "input",
   "artifact": path of the .mge, "output": path, "fastrun": bool (run it with profiled kernels)}
     -> {"ok": true, "form": "deploy", "seconds": float}; the artifact's output on input -> output
  {"op": "run_traced", "artifact": path of a .mge, "input": path, "output": path, "fastrun": bool}
     -> {"ok": true, "seconds": float}; the artifact's output on input -> output
  {"op": "time", "model"/"block"/"num_classes", "form": "train", "state", "input",
   "repeats": int, "warmup": int (default 1), "fastrun": bool}
     -> {"ok": true, "times": {"train": [s, ...], "deploy": [s, ...]}, "seconds": float}: the
     loaded train form and its re-parameterized deploy form each predict on input, in interleaved
     rounds (reparam_core.bench.timing.interleaved_times; `warmup` untimed rounds first)
  {"op": "shutdown"} -> {"ok": true}, then exit.
Errors: {"ok": false, "type": exception class name, "error": message}; the worker keeps serving.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from typing import Any

from reparam_core.bench.protocol import open_protocol
from reparam_core.errors import ArgumentError, SpecError


def _build(req: dict[str, Any]) -> Any:
    from backends.megengine import build_block, model_from_spec
    from reparam_core import block_spec_from_dict, get_spec

    form = req.get("form", "train")
    if form not in ("train", "deploy"):
        raise SpecError(f"form must be 'train' or 'deploy', got {form!r}")
    deploy = form == "deploy"
    if req.get("model"):
        return model_from_spec(get_spec(req["model"], int(req.get("num_classes", 1000))), deploy=deploy)
    if req.get("block"):
        return build_block(block_spec_from_dict(req["block"]), deploy=deploy)
    raise SpecError("request needs a 'model' name or a 'block' spec")


def _loaded(req: dict[str, Any]) -> tuple[Any, Any]:
    from backends.megengine import load_state
    from reparam_core.formats.safetensors_io import load_file

    module = _build(req)
    state, _ = load_file(req["state"])
    load_state(module, state)
    x = load_file(req["input"])[0]["x"]
    return module, x


def _predict(req: dict[str, Any]) -> dict[str, Any]:
    from backends.megengine import export_state, predict, reparameterize
    from reparam_core.formats.safetensors_io import save_file

    module, x = _loaded(req)
    if req.get("reparameterize"):
        module = reparameterize(module)
    y = predict(module, x, fastrun=bool(req.get("fastrun", False)))
    save_file({"y": y}, req["output"])
    if req.get("export_state"):
        save_file(export_state(module), req["export_state"])
    return {"form": "deploy" if module.deploy else "train"}


def _export_traced(req: dict[str, Any]) -> dict[str, Any]:
    from backends.megengine import export_traced, run_traced
    from reparam_core.formats.safetensors_io import save_file

    module, x = _loaded(req)
    export_traced(module, req["artifact"], tuple(x.shape))
    y = run_traced(req["artifact"], x, fastrun=bool(req.get("fastrun", False)))
    save_file({"y": y}, req["output"])
    return {"form": "deploy"}


def _run_traced(req: dict[str, Any]) -> dict[str, Any]:
    from backends.megengine import run_traced
    from reparam_core.formats.safetensors_io import load_file, save_file

    x = load_file(req["input"])[0]["x"]
    save_file({"y": run_traced(req["artifact"], x, fastrun=bool(req.get("fastrun", False)))}, req["output"])
    return {}


def _time(req: dict[str, Any]) -> dict[str, Any]:
    from backends.megengine import predict, reparameterize
    from reparam_core.bench.timing import interleaved_times

    if req.get("form", "train") != "train":
        raise SpecError("time: the state must be of the train form (its deploy form is made here)")
    train, x = _loaded(req)
    deploy = reparameterize(train)
    fast = bool(req.get("fastrun", False))
    times = interleaved_times(
        {"train": lambda: predict(train, x, fastrun=fast), "deploy": lambda: predict(deploy, x, fastrun=fast)},
        int(req["repeats"]),
        warmup=int(req.get("warmup", 1)),
    )
    return {"times": times}


_OPS = {"predict": _predict, "export_traced": _export_traced, "run_traced": _run_traced, "time": _time}


def handle(req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if op == "ping":
        import megengine

        return {"megengine": megengine.__version__, "python": platform.python_version()}
    if op in _OPS:
        return _OPS[op](req)
    if op == "shutdown":
        return {}
    raise ArgumentError(f"unknown op {op!r}; expected ping, {', '.join(_OPS)} or shutdown")


def main() -> int:
    proto = open_protocol()
    from backends.megengine.quiet import import_megengine

    import_megengine()
    for line in sys.stdin:
        if not line.strip():
            continue
        t0 = time.perf_counter()
        op = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ArgumentError("a request must be a JSON object")
            op = req.get("op")
            reply = {"ok": True, **handle(req)}
            if op in _OPS:
                reply["seconds"] = round(time.perf_counter() - t0, 6)
        except Exception as e:
            reply = {"ok": False, "type": type(e).__name__, "error": str(e)}
        proto.write(json.dumps(reply) + "\n")
        proto.flush()
        if op == "shutdown":
            break
    proto.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
