"""The model side shared by training, export and evaluation: the nets (nets.py), the deployed module every
artifact contains (deployed.py) and the checkpoint that rebuilds both (checkpoint.py). Those three import torch;
this module does not, so that options can be checked before torch is imported.
"""

from __future__ import annotations

from cifarkit.errors import CifarkitError

# The keys of cifarkit.model.nets.MODELS, in its order.
MODEL_NAMES: tuple[str, ...] = ("blog_cnn", "airbench", "sprint")


def check_model_name(name: str) -> None:
    """A CifarkitError listing the known models unless `name` is one."""
    if name not in MODEL_NAMES:
        raise CifarkitError(f"--model: unknown model {name!r}, expected one of {', '.join(sorted(MODEL_NAMES))}")
