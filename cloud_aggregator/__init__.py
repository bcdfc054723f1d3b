"""Non-colluding cloud parties holding additive secret shares: secure aggregation of
hospital updates and encrypted inference from the secret-shared global model."""
