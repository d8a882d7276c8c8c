"""The isolation ledger: one interface, stored in SQLite, S3 or PostgreSQL."""
