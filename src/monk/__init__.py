"""monk: a PostgreSQL database per tenant, cloned from pre-built templates, crash-safe."""

__version__ = "0.1.0"
