"""Pure decisions: what a request, a manifest, a policy or a token means, and what may happen.

No mitmproxy, no network, no files: the import contract in pyproject.toml keeps it so.
"""
