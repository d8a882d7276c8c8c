"""The engine under the gateway: patches to the pinned mitmproxy and h11, gateway process only."""
