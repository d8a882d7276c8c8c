"""The mitmdump script: `mitmdump -s addons/gateway.py`. The order below is the hook order.

1. TokenEndpoint   `/auth/token`: Tabbify JWT → registry token
2. RegistryAccess  everything else: token, namespace, header hygiene, streaming
3. TenantIsolation digests a tenant has no record of never reach the backend
4. Refusals        delivers 4xx decisions without buffering request bodies
5. AccessLog       one JSON line per request, counted in the metrics
6. Capture, Admin  the operator's loopback endpoint: /healthz, /metrics, /capture
"""

import logging
import sys

from mitmproxy.proxy.layers.http import _http1

from addons import oci
from addons.access import RegistryAccess
from addons.accesslog import AccessLog
from addons.admin import Admin
from addons.capture import Capture
from addons.isolation import TenantIsolation
from addons.metrics import Metrics
from addons.refusal import Refusals
from addons.token_endpoint import TokenEndpoint
from addons.tokens import TokenSigner

# stdout is the access log (JSON lines); mitmproxy's own log lines go to stderr.
for handler in logging.getLogger().handlers:
    if hasattr(handler, "file"):
        handler.file = sys.stderr

_http1.make_error_response = oci.protocol_error_response  # no HTML error pages, ever

_signer = TokenSigner()  # secret made here, once per process, never written anywhere
_metrics = Metrics()
_capture = Capture()

addons = [
    TokenEndpoint(_signer),
    RegistryAccess(_signer),
    TenantIsolation(),
    Refusals(),
    AccessLog(_metrics),
    _capture,
    Admin(_metrics, _capture),
]
