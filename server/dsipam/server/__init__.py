"""The dsipam server: gRPC service, allocation engine and PostgreSQL store."""

__version__ = "0.1.0"
