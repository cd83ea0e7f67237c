"""Dependencies point down the layout: each stage imports only what it needs (checked in fresh processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loaded_after(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize(
    ("module", "never"),
    [
        ("cifarkit.export", {"cifarkit.train", "cifarkit.data", "cifarkit.batches", "cifarkit.runtime", "PIL"}),
        ("cifarkit.models", {"cifarkit.data", "cifarkit.batches", "cifarkit.files", "PIL"}),
        ("cifarkit.data", {"torch", "cifarkit.models"}),
        ("cifarkit.infer", {"torch", "cifarkit.models", "cifarkit.checkpoint"}),
        ("cifarkit.recipes", {"torch", "numpy"}),
        ("cifarkit.spec", {"torch", "numpy"}),
    ],
)
def test_module_imports_only_what_it_needs(module, never):
    loaded = _loaded_after(module)
    assert not (never & loaded), f"{module} imports {sorted(never & loaded)}"
