"""
egressproxy: an HTTP/1.1 egress proxy on Twisted that never connects to a
destination its policy has not vetted.
"""

__version__ = "0.1.0"
