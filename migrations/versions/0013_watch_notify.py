"""Watch fan-out wake-ups and the token key table.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05

* A statement-level trigger on the event outbox ``ipam_events`` sends
  ``pg_notify('dsipam_events', <pool id>)`` once per pool per inserting statement, in the
  transaction that writes the events (so the wake-up is delivered exactly when the events
  commit, and never for a rolled-back change). Every writer of events (the fast-path SQL
  functions and the full path) is covered without changing it. Servers LISTEN on one
  dedicated connection per process and read the outbox once for all their watch streams.
* ``ipam_token_keys``: the keys that authenticate page and resume tokens when no key is
  configured (DSIPAM_TOKEN_KEY). One random key is made here (gen_random_uuid() draws from
  PostgreSQL's strong random source), so all replicas share it; a rotation is one
  ``INSERT INTO ipam_token_keys DEFAULT VALUES`` (docs/security.md).

Online: a new function, trigger and one-row table; no rewrite.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# 32 random bytes: two version-4 UUIDs (122 random bits each) without their dashes.
_RANDOM_KEY = "decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex')"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION dsipam_notify_events() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            p integer;
        BEGIN
            FOR p IN SELECT DISTINCT pool_id FROM new_events LOOP
                PERFORM pg_notify('dsipam_events', p::text);
            END LOOP;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER ipam_events_notify AFTER INSERT ON ipam_events REFERENCING NEW TABLE AS new_events "
        "FOR EACH STATEMENT EXECUTE FUNCTION dsipam_notify_events()"
    )
    op.create_table(
        "ipam_token_keys",
        sa.Column("id", sa.Integer, sa.Identity(), nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=False, server_default=sa.text(_RANDOM_KEY)),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_ipam_token_keys"),
        sa.CheckConstraint("octet_length(key) >= 32", name="ck_ipam_token_keys_key_length"),
    )
    op.execute("INSERT INTO ipam_token_keys DEFAULT VALUES")


def downgrade() -> None:
    op.drop_table("ipam_token_keys")
    op.execute("DROP TRIGGER ipam_events_notify ON ipam_events")
    op.execute("DROP FUNCTION dsipam_notify_events()")
