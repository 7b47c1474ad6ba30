"""Alembic environment: runs on the connection the store hands over (`attributes`)."""

from alembic import context

from metering_core.sql.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
