"""The admin program: the operator's loopback endpoint and the live view of traffic."""
