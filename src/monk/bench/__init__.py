"""``monk bench``: provisioning latency and throughput, measured against raw PostgreSQL."""
