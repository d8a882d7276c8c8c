"""tabbify-registry's Python, one package per layer (docs/internals.md draws the layout).

From the top: `cli` (the commands), `admin` (the operator's endpoint), `gateway` (the mitmproxy
addons, in `gateway/chain.py`'s order), then `clients`, `storage`, `engine`, `config`,
`runstate` and the pure `decisions`. Nothing imports upward (pyproject.toml, import-linter).
"""
