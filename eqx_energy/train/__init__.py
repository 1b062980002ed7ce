"""Training: config loading, sharding, optimizer, metrics (step and loop on top of them)."""
