"""The registry's configuration: environment (contract §2), nodes, mirrors, token keys."""
