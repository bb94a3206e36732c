"""Batch API: the model a batch's lines name (``Batch.model`` in OpenAI's batch object).

Revision ID: 0004_batch_model
Revises: 0003_batches
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_batch_model"
down_revision: str | None = "0003_batches"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the nullable ``batches.model`` (batches made before it report no model)."""
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("model", sa.String(length=200), nullable=True))


def downgrade() -> None:
    """Drop ``batches.model``."""
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("model")
