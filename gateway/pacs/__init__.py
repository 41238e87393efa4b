"""Towards PACS peers: studies fetched, retrieved again on demand, local copies retained."""
