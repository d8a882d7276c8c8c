"""The gateway: mitmproxy addons and the pure decisions they wrap.

Follow one request: `gateway.py` lists the addons in hook order; `routes.py` decides what a path
is and whether a tenant may touch it; `tokens.py` mints and verifies registry tokens;
`authservice.py` asks Tabbify auth about a Tabbify JWT; `oci.py` shapes every error.
"""
