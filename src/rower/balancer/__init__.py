"""`rower balancer`."""
