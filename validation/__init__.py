"""great-expectations suites as code, and the gate every job runs before it commits a table.

    from llmfeat.validation import gate, repr_suite
    report = gate(frame, repr_suite("items", "item_id", width=576), table="items_repr", tables=t, run_id=r)

Importing this package is cheap; great-expectations loads on first use of a suite or the gate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmfeat.validation.gating import GateFailed, GateReport, gate, new_run_id
    from llmfeat.validation.reference import norm_bounds_from
    from llmfeat.validation.suites import (
        Suite,
        counters_suite,
        drift_suite,
        feature_suite,
        item_meta_suite,
        raw_suite,
        repr_suite,
        training_set_suite,
    )

_WHERE = {
    "gate": "llmfeat.validation.gating",
    "GateFailed": "llmfeat.validation.gating",
    "GateReport": "llmfeat.validation.gating",
    "new_run_id": "llmfeat.validation.gating",
    "norm_bounds_from": "llmfeat.validation.reference",
    "Suite": "llmfeat.validation.suites",
    "raw_suite": "llmfeat.validation.suites",
    "repr_suite": "llmfeat.validation.suites",
    "feature_suite": "llmfeat.validation.suites",
    "item_meta_suite": "llmfeat.validation.suites",
    "counters_suite": "llmfeat.validation.suites",
    "training_set_suite": "llmfeat.validation.suites",
    "drift_suite": "llmfeat.validation.suites",
}
__all__ = [
    "gate",
    "GateFailed",
    "GateReport",
    "new_run_id",
    "norm_bounds_from",
    "Suite",
    "raw_suite",
    "repr_suite",
    "feature_suite",
    "item_meta_suite",
    "counters_suite",
    "training_set_suite",
    "drift_suite",
]


def __getattr__(name: str) -> Any:
    import importlib

    if name not in _WHERE:
        raise AttributeError(f"module 'validation' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
