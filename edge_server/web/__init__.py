"""The clinician's page: a small server-rendered web app served by the hospital's edge.

Staff sign in (accounts in the edge's data dir, argon2id hashes), find a patient in the
edge's store, see the patient's modalities, and ask the cloud for an encrypted prediction
beside the edge's own ONNX prediction. Every request is written to the audit log.
"""
from edge_server.web.accounts import Accounts, AccountError
from edge_server.web.app import CloudError, create_app
from edge_server.web.settings import WebSettings

__all__ = ["Accounts", "AccountError", "CloudError", "WebSettings", "create_app"]
