"""The autoscaling benchmark of issue 13 (`make bench-autoscale`)."""
