"""one leased task per rater per round

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("uq_assignment_one_lease", "assignments", ["round_id", "rater_id"], unique=True,
                    sqlite_where=sa.text("state = 'leased'"), postgresql_where=sa.text("state = 'leased'"))


def downgrade() -> None:
    op.drop_index("uq_assignment_one_lease", table_name="assignments")
