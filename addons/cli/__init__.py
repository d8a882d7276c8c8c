"""The `tabbify-registry` commands: run, config, mesh up, policy, gc, dev-auth."""
