import time, gc, httptools
from proxy_app.http1 import ResponseReader
class Sink:
    def informational(self, h): pass
    def head(self, h): pass
    def body(self, d): pass
    def complete(self): pass
RESP = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: application/octet-stream\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024)
r = ResponseReader(Sink())
def expect(n):
    e = r.expect
    for _ in range(n): e(False)
def newparser(n):
    for _ in range(n): httptools.HttpResponseParser(r)
def cycle(n):
    e = r.expect; f = r.feed
    for _ in range(n): e(False); f(RESP)
gc.freeze()
for name, fn, n in (("expect()", expect, 100000), ("HttpResponseParser(reader)", newparser, 100000), ("expect + feed", cycle, 50000)):
    best = min((lambda: (lambda t: (fn(n), time.perf_counter() - t)[1])(time.perf_counter()))() for _ in range(9)) / n * 1e6
    print(f"  {name:28s} {best:6.2f} µs")
