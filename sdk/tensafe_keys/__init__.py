"""TenSafe's key store: server-side key management, apart from the client SDK.

Tenant key sets (KEKs, the audit and receipt secrets, their generations), the artifacts' wrapped data keys,
ledger heads and revocations, in a folder (store.py) or a Kubernetes Secret (kubernetes.py); and private,
durable file writes (private_files.py). Used by the trainer, the operator and the admin tools; the client SDK
(tg_tinker) does not import it.
"""
