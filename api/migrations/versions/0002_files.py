"""Files API: the ``files`` table (uploads and server-written batch outputs).

Revision ID: 0002_files
Revises: 0001_initial
Create Date: 2025-02-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_files"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``files`` with its owner index, as :class:`api.db.StoredFile` declares it."""
    op.create_table(
        "files",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("line_count", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_files_key_id", "files", ["key_id"], unique=False)


def downgrade() -> None:
    """Drop ``files`` (the stored contents in ``FILES_DIR`` are left in place)."""
    op.drop_index("ix_files_key_id", table_name="files")
    op.drop_table("files")
