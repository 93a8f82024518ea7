"""The benchmark chain on other PostgreSQL job queues, one small module per queue (for peers.py)."""
