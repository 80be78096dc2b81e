"""Human approval of high-risk tool calls.

:class:`~tools.approvals.gate.HumanApprovalGate` is the
:class:`~tools.contracts.ApprovalGate`; it keeps approvals in an
:class:`~tools.approvals.store.ApprovalStore`:
:class:`~tools.approvals.sqlite_store.SqliteApprovalStore` on one machine,
:class:`~tools.approvals.redis_store.RedisApprovalStore` across replicas
(:func:`~tools.approvals.factory.open_approval_store` picks one from the settings).
The concrete stores are imported from their modules, so importing this package
loads no database driver.
"""

from tools.approvals.gate import HumanApprovalGate, new_approval_id, summarize
from tools.approvals.store import (
    ApprovalChanges,
    ApprovalStore,
    ApprovalStoreUnavailable,
    DuplicateApprovalId,
)

__all__ = [
    "ApprovalChanges",
    "ApprovalStore",
    "ApprovalStoreUnavailable",
    "DuplicateApprovalId",
    "HumanApprovalGate",
    "new_approval_id",
    "summarize",
]
