"""Probe every zoo entry: parameters, one forward, and whether torch.export captures it.

Run as ``python tests/zoo_probe.py [ClassName ...]``. Prints one row per entry:
class, parameter count, forward seconds, and ``ok`` or the first line of the export error
(``n/a`` when forward takes no ``return_dict``).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zoo import ZOO, ZOO_SKIPPED, check  # noqa: E402


def probe_export(entry) -> str:
    model = entry.build()
    if "return_dict" not in inspect.signature(model.forward).parameters:
        return "n/a (forward has no return_dict)"
    kwargs = {**entry.inputs(2, 0.5), "return_dict": True}
    logging.disable(logging.CRITICAL)  # export logs whole graphs on data-dependent failures
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.export.export(model, (), kwargs, strict=False)
        return "ok"
    except Exception as e:  # noqa: BLE001
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return f"{type(e).__name__}: {lines[0][:150] if lines else ''}"
    finally:
        logging.disable(logging.NOTSET)


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    wanted = set(sys.argv[1:])
    print(f"{'class':44s} {'params':>10s} {'fwd_s':>6s}  export")
    n_ok = 0
    start = time.perf_counter()
    for entry in ZOO:
        if wanted and not {entry.name, entry.label} & wanted:
            continue
        try:
            r = check(entry)
            params, fwd = f"{r['params']:,d}", f"{r['forward_s']:.2f}"
        except Exception as e:  # noqa: BLE001
            print(f"{entry.label:44s} FORWARD FAILED {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        result = probe_export(entry)
        n_ok += result == "ok"
        print(f"{entry.label:44s} {params:>10s} {fwd:>6s}  {result}", flush=True)
    print(f"\n{n_ok}/{len(ZOO)} exported; {time.perf_counter() - start:.0f}s")
    if ZOO_SKIPPED and not wanted:
        print("\nskipped:")
        for name, why in ZOO_SKIPPED.items():
            print(f"  {name}: {why}")


if __name__ == "__main__":
    main()
