"""The RESP server: a gevent StreamServer in front of the engine."""
