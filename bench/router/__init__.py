"""Router benchmarks: overhead, multi-turn cache/session awareness, failover (`make bench-router`)."""
