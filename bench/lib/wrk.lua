-- wrk script for bench/run.  wrk has no proxy support, so the request is
-- written as a proxy expects it: an absolute URI in the request line and
-- the origin's Host header, sent to the proxy's port.  For the direct
-- baseline BENCH_PATH is an origin-form path ("/small") instead.
--
-- Environment:
--   BENCH_PATH       request target, e.g. http://127.0.0.1:8080/small
--   BENCH_HOST       Host header, e.g. 127.0.0.1:8080
--   BENCH_METHOD     GET (default) or POST
--   BENCH_BODY_SIZE  POST body size in bytes (default 0: no body)
--   BENCH_CLOSE      "1": send "Connection: close" on every request
--
-- Setting wrk.* at load time (no request() function) keeps wrk's fast path:
-- the request is formatted once and resent as is.

wrk.method = os.getenv("BENCH_METHOD") or "GET"
wrk.path = os.getenv("BENCH_PATH") or "/"
wrk.headers["Host"] = os.getenv("BENCH_HOST")
wrk.headers["User-Agent"] = "egressproxy-bench"
if os.getenv("BENCH_CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end
local size = tonumber(os.getenv("BENCH_BODY_SIZE") or "0")
if size > 0 then
  wrk.body = string.rep("x", size)
  wrk.headers["Content-Type"] = "application/octet-stream"
end

-- One machine-readable line; latencies are in microseconds.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d,"lat_mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
