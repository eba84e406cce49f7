"""`make bench-traffic` (issue 12): canary rollout and rollback under load, split accuracy,
fallback with the primary pool killed, and an ensemble of SmolLM2 members on labelled questions."""
