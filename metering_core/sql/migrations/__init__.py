"""Alembic migrations of the durable store, shipped in the package."""
