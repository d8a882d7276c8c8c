"""Mesh bootstrap: WireGuard identity, coordinator join, interface, peer following."""
