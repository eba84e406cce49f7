"""Asynchronous serving: durable jobs and batches on NATS JetStream (docs/architecture.md, "Jobs")."""
