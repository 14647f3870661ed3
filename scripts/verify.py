"""`reparam verify`: the parity matrix outside pytest, as a table of relative errors.

Each cell is max|y - y_oracle| / max|y_oracle| for one case and one (backend, form); the form
`artifact` is the framework's deploy artifact (ONNX Runtime, traced .mge, StableHLO).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from parity_tests.cases import block_matrix, model_cases
from parity_tests.harness import BACKENDS, FORMS, Case, CaseResult, make_runners, run_case
from reparam_core.errors import ArgumentError, BackendUnavailableError, VerificationError
from reparam_core.families.specs import resolve_model_name

from .progress import Progress


def select_cases(models: list[str] | None, blocks: bool, size: int) -> list[Case]:
    cases = model_cases(size)
    if models is not None:
        names = {resolve_model_name(m) for m in models}  # aliases too; unknown names fail here
        cases = [c for c in cases if c.name in names]
    return cases + (block_matrix() if blocks else [])


def format_table(results: list[CaseResult], backends: list[str], forms: tuple[str, ...]) -> str:
    cols = [(b, f) for b in backends for f in forms]
    head = ["case"] + [f"{b}/{f}" for b, f in cols] + ["tol", "ok"]
    rows = [head]
    for r in results:
        cells = [f"{r.errors[c]:.1e}" if c in r.errors else ("FAIL" if c[0] in r.failures else "-") for c in cols]
        rows.append([r.case.name] + cells + [f"{r.tolerance:.0e}", "yes" if r.ok else "NO"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        type=lambda s: s.split(","),
        default=None,
        help="comma-separated model names (default: every registered model)",
    )
    parser.add_argument(
        "--backends",
        type=lambda s: s.split(","),
        default=list(BACKENDS),
        help="comma-separated subset of torch,flax,megengine",
    )
    parser.add_argument("--size", type=int, default=64, help="input size of model cases (default 64)")
    parser.add_argument("--no-blocks", action="store_true", help="skip the block matrix")
    parser.add_argument("--artifacts", action="store_true", help="also export and run each framework's deploy artifact")
    parser.add_argument("--json", metavar="FILE", help="write every cell to FILE")


def run(args: argparse.Namespace) -> int:
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad:
        raise ArgumentError(f"unknown backend {bad[0]!r}; choose from {', '.join(BACKENDS)}")
    cases = select_cases(args.models, not args.no_blocks, args.size)
    runners, unavailable = make_runners(tuple(args.backends))
    if not runners:
        raise BackendUnavailableError(
            "no backend can run here: " + "; ".join(f"{name}: {why}" for name, why in unavailable.items())
        )
    for name, why in unavailable.items():
        print(f"{name}: unavailable ({why})", file=sys.stderr)
    results: list[CaseResult] = []
    t0 = time.perf_counter()
    with Progress([c.name for c in cases], desc="verify") as bar:
        for case in cases:
            bar.stage(case.name)
            results.append(run_case(case, runners, artifacts=args.artifacts))
    total = time.perf_counter() - t0
    forms = FORMS if args.artifacts else FORMS[:2]
    print(format_table(results, list(runners), forms))
    cells = [(r.case.name, b, f, e) for r in results for (b, f), e in r.errors.items()]
    if cells:  # none when every run failed
        worst = max(cells, key=lambda c: c[3] / next(r.tolerance for r in results if r.case.name == c[0]))
        print(
            f"\nworst cell: {worst[0]} {worst[1]}/{worst[2]} rel err {worst[3]:.2e}; "
            f"{len(cells)} cells, {len(results)} cases in {total:.1f} s"
        )
    for r in results:
        for b, msg in r.failures.items():
            print(f"FAILED {r.case.name} [{b}]: {msg}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"seconds": total, "unavailable": unavailable, "cases": [r.to_json() for r in results]}, f, indent=1
            )
    failed = [r.case.name for r in results if not r.ok]
    if failed:  # exit 1 (scripts.cli)
        raise VerificationError(
            f"{len(failed)} of {len(results)} case(s) failed or exceed their "
            f"tolerance: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}"
        )
    if unavailable:  # exit 2: the check could not run everywhere it was asked to
        raise BackendUnavailableError(f"not verified in {', '.join(unavailable)} (unavailable here)")
    return 0
