"""Governance: the audit log, the lineage registry and the documents generated from it."""
