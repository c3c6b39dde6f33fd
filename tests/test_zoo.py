"""The pass over every diffusers transformer of the zoo (tests/zoo.py, tests/coverage.py).

Every model runs the checks eagerly; the model families the project names (DiT,
PixArt, FLUX, SD3, Latte, Wan, HiDream) also run ToCa and DuCa compiled with inductor
(`TOCACHE_ZOO_COMPILE=all` compiles every model: about an hour on 2 CPU cores). A model
the pass cannot handle must fail with `UnsupportedModelError` and is recorded so.
"""

from __future__ import annotations

import os

import pytest

from zoo import ZOO
from zoo_coverage import COMPILED, check

# Each must be captured and PARTIAL-able somewhere (the families the pass is built for).
REQUIRED = COMPILED
# Refused with UnsupportedModelError (data-dependent shapes or guards); any other model
# must pass, so a regression in either direction fails.
UNSUPPORTED = {"MochiTransformer3DModel"}  # a text-mask nonzero inside its attention
# Compiled in CI too, for what they exercise: CogView3Plus' branch outputs are views of its
# joint text+image sequence, and every graph reading a cache slot is compiled for one layout
# (a slot's strides once changed between steps and recompiled).
# Kandinsky 6 SR's captured flex attention cannot be traced by Dynamo again: compiling is
# refused with a clear error, and every check runs eagerly.
COMPILED_TOO = {"CogView3PlusTransformer2DModel", "Kandinsky6SRTransformer3DModel"}
COMPILE_REFUSED = {"Kandinsky6SRTransformer3DModel": "flex_attention in self_attention"}


@pytest.mark.parametrize("entry", ZOO, ids=[entry.label for entry in ZOO])
def test_zoo_model(entry):
    compile = entry.name in COMPILED | COMPILED_TOO or os.environ.get("TOCACHE_ZOO_COMPILE") == "all"
    row = check(entry, compile=compile)
    if entry.name in REQUIRED:
        assert row.status == "passes", row.status
        assert "(0 PARTIAL-able)" not in row.branches, row.branches
    if entry.name in UNSUPPORTED:
        assert row.status.startswith("not supported: "), row.status
    elif compile and entry.name in COMPILE_REFUSED:
        assert row.status.startswith(f"passes (not compiled: {COMPILE_REFUSED[entry.name]}"), \
            row.status
    else:
        assert row.status == "passes", row.status
