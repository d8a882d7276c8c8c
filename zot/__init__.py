"""Renders the config of the registry (Zot or CNCF Distribution) behind the gateway."""
