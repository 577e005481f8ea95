"""Code that runs inside a sidecar worker process."""
