"""Feedly example app: the real computations behind the ten ad-pipeline stages.

The pipeline wiring (database, LISTEN/NOTIFY, stage handlers) lives in ``pgstagechain``;
this package only holds database-independent image/text work, in ``vision``.
"""
