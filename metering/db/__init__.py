"""Storage: SQLAlchemy 2 models, engine and session factory (SQLite and PostgreSQL)."""
