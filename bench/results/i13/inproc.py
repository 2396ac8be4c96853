"""
In-process cost of one exchange through the tree on PYTHONPATH: the proxy's
protocols driven by hand on a MemoryReactorClock (tests/helpers.py's
harness, but with no log observer, as in the bench: logs off), no sockets.
Prints µs of CPU per exchange, best of R repetitions of N exchanges.

Usage (third session, docs/benchmarks.md): from outside the tree,
  PYTHONPATH=TREE bench/.work/venv-egressproxy/bin/python inproc.py TREE N R
The call counts were its exchange functions run under cProfile.
"""
import gc, sys, time
sys.path.insert(0, sys.argv[1])  # the tree, for tests.helpers
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from proxy_app.config import Config
from proxy_app.observe import AccessLog
from proxy_app.server import ProxyFactory
from proxy_app.upstream import Connector
from tests.helpers import FakeDestinationResolver, HalfCloseStringTransport

RESP = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 04:30:00 GMT\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
        b"Last-Modified: Sun, 06 Dec 2026 04:00:00 GMT\r\nConnection: keep-alive\r\n"
        b"ETag: \"abc-400\"\r\nAccept-Ranges: bytes\r\n\r\n" + b"x" * 1024)
RESP_CLOSE = RESP.replace(b"keep-alive", b"close")
OK = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
OK_CLOSE = OK.replace(b"Content-Length: 2", b"Connection: close\r\nContent-Length: 2")
GET = b"GET http://203.0.113.10:8080/small HTTP/1.1\r\nHost: 203.0.113.10:8080\r\nUser-Agent: wrk\r\n\r\n"
POST = (b"POST http://203.0.113.10:8080/webhook HTTP/1.1\r\nHost: 203.0.113.10:8080\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2048\r\n\r\n" + b"{" + b"a" * 2046 + b"}")
GETC = GET.replace(b"/small", b"/close/small").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
POSTC = POST.replace(b"/webhook", b"/close/webhook").replace(b"Content-Length", b"Connection: close\r\nContent-Length")

def factory():
    reactor = MemoryReactorClock()
    resolver = FakeDestinationResolver({"203.0.113.10": ["203.0.113.10"]})
    config = Config()
    f = ProxyFactory(config, resolver, reactor, Connector(reactor, config.timeouts.connect), AccessLog(None))
    return reactor, f

def client(f, port=40000):
    p = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
    t = HalfCloseStringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
    p.makeConnection(t)
    return p, t

def connect(reactor, index=-1):
    host, port, fac, timeout, bind = reactor.tcpClients[index]
    up = fac.buildProtocol(IPv4Address("TCP", host, port))
    ut = HalfCloseStringTransport(peerAddress=IPv4Address("TCP", host, port))
    up.makeConnection(ut)
    return up, ut

def keepalive(req, resp, n):
    reactor, f = factory()
    p, t = client(f)
    p.dataReceived(req)
    up, ut = connect(reactor)
    up.dataReceived(resp)
    assert t.value().startswith(b"HTTP/1.1 200"), t.value()[:200]
    t.clear(); ut.clear()
    start = time.process_time()
    for _ in range(n):
        p.dataReceived(req)
        up.dataReceived(resp)
    el = time.process_time() - start
    assert t.value().count(b"HTTP/1.1 200") == n, t.value()[:300]
    assert len(reactor.tcpClients) == 1
    return el / n

def close(req, resp, n):
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionDone
    reactor, f = factory()
    start = time.process_time()
    for i in range(n):
        p, t = client(f, 40000 + i % 20000)
        p.dataReceived(req)
        up, ut = connect(reactor)
        up.dataReceived(resp)
        up.connectionLost(Failure(ConnectionDone()))
        p.connectionLost(Failure(ConnectionDone()))
        reactor.advance(0)
    el = time.process_time() - start
    assert len(reactor.tcpClients) == n
    return el / n

gc.freeze()
cases = {"GET keep-alive": (keepalive, GET, RESP), "POST keep-alive": (keepalive, POST, OK),
         "GET close": (close, GETC, RESP_CLOSE), "POST close": (close, POSTC, OK_CLOSE)}
N, R = int(sys.argv[2]), int(sys.argv[3])
for name, (fn, req, resp) in cases.items():
    best = min(fn(req, resp, N) for _ in range(R))
    print(f"{name:16s} {best*1e6:7.1f} µs")
