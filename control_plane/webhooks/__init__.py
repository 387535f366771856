"""Webhooks: what is announced (``events.py``), how it is signed (``signing.py``) and how the
outbox is delivered (``sender.py``)."""
