"""Notebook views over labkit's stores: the training dashboard and the comparison labeler.

Names are imported on first use, so that `from labkit.widgets import X` loads only X's module
(the dashboard pulls in plotly; a labeling session need not).
"""

import importlib
from typing import TYPE_CHECKING

# public name -> module that defines it; add one line per widget
_EXPORTS = {
    "Dashboard": "labkit.widgets.dashboard",
    "ComparisonLabeler": "labkit.widgets.labeler",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # for editors and type checkers, which do not run __getattr__
    from labkit.widgets.dashboard import Dashboard as Dashboard  # "as": re-exported (__all__ is built from _EXPORTS)
    from labkit.widgets.labeler import ComparisonLabeler as ComparisonLabeler


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'labkit.widgets' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value
