"""The operator's page: a read-only view of the federation, served by the coordinator.

Hospitals, rounds as a timeline, privacy budgets, the parties' health and MPC group state,
and global model versions, updated live. Signed in with the same Ed25519 bearer tokens as
the coordinator's API (role ``coordinator``), exchanged once for a session cookie.
"""
from cloud_aggregator.operator_page.operator import install_operator_page

__all__ = ["install_operator_page"]
