"""
The container image's HEALTHCHECK: exit 0 if the proxy's /healthcheck
answers 200, else 1.  It answers 503 from the moment the proxy starts
draining (SIGTERM), so a draining container reports unhealthy.

It asks the metrics endpoint named by EGRESSPROXY_METRICS (the image sets
tcp:2112:interface=0.0.0.0) over loopback, with http.client, which unlike
urllib never goes through an HTTP_PROXY set in the environment.
"""

import http.client
import os
import sys


def target(endpoint: str) -> tuple[str, int]:
    """
    The address to ask, from a tcp: or tcp6: endpoint description: its
    interface, or loopback for a wildcard one.
    """
    parts = endpoint.split(":")
    kind = parts[0] if parts else ""
    port = 2112
    host = "::1" if kind == "tcp6" else "127.0.0.1"
    for part in parts[1:]:
        if part.isdigit():
            port = int(part)
        elif part.startswith("port="):
            port = int(part[len("port=") :])
        elif part.startswith("interface="):
            interface = part[len("interface=") :].replace("\\", "")
            if interface not in ("", "0.0.0.0", "::"):
                host = interface
    return host, port


def main() -> int:
    endpoint = os.environ.get("EGRESSPROXY_METRICS", "").strip()
    host, port = target(endpoint or "tcp:2112")
    try:
        connection = http.client.HTTPConnection(host, port, timeout=2)
        connection.request("GET", "/healthcheck")
        status = connection.getresponse().status
    except OSError as e:
        print(f"healthcheck: {host} port {port}: {e}")
        return 1
    print(f"healthcheck: {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
