"""`make bench-cache`: the shared cache's figures (issue 14) on the torch engine."""
