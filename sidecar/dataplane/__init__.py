"""The data plane: how tensor bytes cross the process boundary (used by worker and host)."""
