"""The chaos benchmark (`make bench-chaos`): faults of every process kind under checked load."""
