"""round_items.filled counter and picking indexes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("round_items") as batch:
        batch.add_column(sa.Column("filled", sa.Integer(), server_default="0", nullable=False))
    op.execute("UPDATE round_items SET filled = (SELECT count(*) FROM assignments "
               "WHERE assignments.item_id = round_items.id AND assignments.slot IS NOT NULL)")
    op.create_index("ix_round_item_pick", "round_items", ["round_id", "filled", "position"])
    op.create_index("ix_round_item_pick_domain", "round_items", ["round_id", "domain", "filled", "position"])


def downgrade() -> None:
    op.drop_index("ix_round_item_pick_domain", table_name="round_items")
    op.drop_index("ix_round_item_pick", table_name="round_items")
    with op.batch_alter_table("round_items") as batch:
        batch.drop_column("filled")
