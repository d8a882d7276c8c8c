"""Clients of the services the registry talks to: its backend (one HTTP client) and Tabbify auth."""
