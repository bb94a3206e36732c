"""Alembic migrations of the inferq SQL schema (driven by :mod:`api.migrate`)."""
