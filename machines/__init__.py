"""One module per diagram in docs/diagrams: each builds its machine from the ``.mmd`` file and binds
the CRM calls and DB writes to its states. Import a module to get its ``MACHINE``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_CHECKOUT_DIAGRAMS = Path(__file__).resolve().parent.parent / "docs" / "diagrams"


def diagram_path(name: str) -> Path:
    """The ``.mmd`` file of a diagram: docs/diagrams in a checkout, ``machines.diagrams`` when installed."""
    local = _CHECKOUT_DIAGRAMS / f"{name}.mmd"
    if local.exists():
        return local
    return Path(str(resources.files("machines.diagrams").joinpath(f"{name}.mmd")))
