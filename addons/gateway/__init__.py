"""The gateway's mitmproxy addons, in `chain.py`'s order, and the flow record they share."""
