"""tabbify-registry: the PID-1 sequence (mesh → backend config → supervisord) and its settings."""
