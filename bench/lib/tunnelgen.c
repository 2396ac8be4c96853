/*
 * tunnelgen: the load of bench/run's tunnel-per-request row (the
 * HTTPS-webhook pattern): N concurrent clients, each in a loop of
 *
 *     connect to the proxy, CONNECT 127.0.0.1:ORIGIN, wait for the 200,
 *     send one request inside the tunnel, read its whole response, close
 *
 * (with --direct, the same without the proxy and the CONNECT).  One
 * thread, non-blocking sockets, epoll; a latency histogram of 10 us
 * buckets from the start of the connect to the end of the response.
 * Everything goes to 127.0.0.1.  Prints one line:
 *
 *     BENCHJSON {"requests":..,"duration_us":..,"errors":..,"lat_p50_us":..,...}
 *
 * Usage: tunnelgen -p PROXY_PORT -o ORIGIN_PORT -c CONNS -d SECONDS
 *                  [-b BODY_BYTES] [-P PATH] [-s SOURCES] [--direct]
 *
 * -s N connects from N source addresses, 127.0.0.2 and up, in turn: with
 * one, connect() spends most of the generator's time looking for an
 * ephemeral port not held in TIME_WAIT by an earlier connection (measured:
 * 14,200 direct connections/s with one source, 20,200 with 64, on one
 * core shared with nginx).
 *
 * The request inside the tunnel is plain HTTP: the proxy relays bytes
 * either way, and TLS handshakes would cost this generator more than the
 * proxy (see docs/benchmarks.md).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUCKET_US 10
#define BUCKETS 1000000 /* 10 s */
#define BUF 65536

enum { CONNECTING, SENT_CONNECT, SENT_REQUEST };

struct conn {
    int fd, state;
    uint64_t started;
    size_t sent, len, got, want; /* what to send; bytes read; body end */
    char in[BUF];
};

static uint32_t hist[BUCKETS];
static char connectReq[256], request[BUF];
static size_t connectLen, requestLen;
static int direct, proxyPort, originPort, epfd, sources = 1;
static uint64_t done, errors;

static void connected(struct conn *c, int early);

static uint64_t now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static void start(struct conn *c) {
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(direct ? originPort : proxyPort);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) { perror("socket"); exit(1); }
    if (sources > 1) {
        /* From 127.0.0.2, 127.0.0.3, ...: each source address has its own
           ephemeral ports, so connect() does not search long past the
           ports still in TIME_WAIT from earlier connections. */
        static unsigned next;
        int one = 1;
        setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(INADDR_LOOPBACK + 1 + next++ % sources);
        if (bind(c->fd, (struct sockaddr *)&src, sizeof src) < 0) { perror("bind"); exit(1); }
    }
    /* No TCP_NODELAY: each message is one write, sent before any reply is
       awaited, so Nagle never holds one back; a syscall saved. */
    c->started = now_us();
    c->state = CONNECTING;
    c->got = c->want = 0;
    if (connect(c->fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) {
        errors++;
    }
    /* Edge-triggered, registered once: no epoll_ctl per state change. */
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLET, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    /* On loopback the handshake is usually done when connect() returns:
       write at once rather than wait for a wake-up to say so. */
    connected(c, 1);
}

static void restart(struct conn *c, int ok) {
    if (ok) {
        uint64_t us = now_us() - c->started, b = us / BUCKET_US;
        hist[b < BUCKETS ? b : BUCKETS - 1]++;
        done++;
    } else {
        errors++;
    }
    close(c->fd);
    start(c);
}

/* Write what remains of the current message; 0 on error. */
static int flush(struct conn *c, const char *msg) {
    while (c->sent < c->len) {
        ssize_t n = write(c->fd, msg + c->sent, c->len - c->sent);
        if (n < 0) return errno == EAGAIN;
        c->sent += n;
    }
    return 1;
}

static void sendRequest(struct conn *c) {
    c->state = SENT_REQUEST;
    c->sent = 0, c->len = requestLen, c->got = 0, c->want = 0;
    if (!flush(c, request)) restart(c, 0);
}

/* The end of a response's head in c->in, and its Content-Length. */
static int head(struct conn *c, size_t *end, size_t *length) {
    c->in[c->got] = 0;
    char *e = strstr(c->in, "\r\n\r\n");
    if (!e) return 0;
    *end = e + 4 - c->in;
    char *cl = strcasestr(c->in, "\r\ncontent-length:");
    *length = cl && cl < e ? strtoul(cl + 17, NULL, 10) : 0;
    return 1;
}

static void readable(struct conn *c) {
    for (;;) {
        if (c->got >= BUF - 1) { restart(c, 0); return; }
        ssize_t n = read(c->fd, c->in + c->got, BUF - 1 - c->got);
        if (n < 0) { if (errno != EAGAIN) restart(c, 0); return; }
        if (n == 0) { restart(c, 0); return; }
        c->got += n;
        size_t end, length;
        if (c->state == SENT_CONNECT) {
            if (!head(c, &end, &length)) continue;
            if (strncmp(c->in, "HTTP/1.1 200", 12) && strncmp(c->in, "HTTP/1.0 200", 12)) {
                restart(c, 0);
                return;
            }
            sendRequest(c);
            return;
        }
        if (c->state == SENT_REQUEST) {
            if (!c->want) {
                if (!head(c, &end, &length)) continue;
                if (strncmp(c->in + 9, "200", 3)) { restart(c, 0); return; }
                c->want = end + length;
            }
            if (c->got >= c->want) { restart(c, 1); return; }
        }
    }
}

/* Send the first message if the connection is up; with `early`, a
   connection still in progress is left for its wake-up. */
static void connected(struct conn *c, int early) {
    const char *msg = direct ? request : connectReq;
    size_t len = direct ? requestLen : connectLen;
    ssize_t n = write(c->fd, msg, len);
    if (n < 0) {
        if (early && (errno == EAGAIN || errno == ENOTCONN)) return;
        restart(c, 0);
        return;
    }
    c->state = direct ? SENT_REQUEST : SENT_CONNECT;
    c->sent = n, c->len = len, c->got = 0, c->want = 0;
}

static void writable(struct conn *c) {
    if (c->state != CONNECTING) {
        if (!flush(c, c->state == SENT_CONNECT ? connectReq : request)) restart(c, 0);
        return;
    }
    int err = 0;
    socklen_t l = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
    if (err) { restart(c, 0); return; }
    connected(c, 0);
}

static uint64_t percentile(double p) {
    uint64_t want = (uint64_t)(p / 100.0 * done), seen = 0;
    for (size_t i = 0; i < BUCKETS; i++) {
        seen += hist[i];
        if (seen > want) return (i + 1) * BUCKET_US;
    }
    return BUCKETS * BUCKET_US;
}

int main(int argc, char **argv) {
    int conns = 50, seconds = 3, body = 0;
    const char *path = "/small";
    for (int i = 1; i < argc; i++) {
        char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "0";
        if (!strcmp(a, "--direct")) { direct = 1; continue; }
        if (!strcmp(a, "-p")) proxyPort = atoi(v);
        else if (!strcmp(a, "-o")) originPort = atoi(v);
        else if (!strcmp(a, "-c")) conns = atoi(v);
        else if (!strcmp(a, "-d")) seconds = atoi(v);
        else if (!strcmp(a, "-b")) body = atoi(v);
        else if (!strcmp(a, "-P")) path = v;
        else if (!strcmp(a, "-s")) sources = atoi(v);
        else { fprintf(stderr, "tunnelgen: unknown option %s\n", a); return 2; }
        i++;
    }
    if (!originPort || (!direct && !proxyPort) || conns < 1 || body < 0 || body > BUF / 2 ||
        sources < 1 || sources > 65000) {
        fprintf(stderr, "usage: tunnelgen -p PROXY_PORT -o ORIGIN_PORT -c N -d S "
                        "[-b BODY] [-P PATH] [-s SOURCES] [--direct]\n");
        return 2;
    }
    connectLen = snprintf(connectReq, sizeof connectReq,
                          "CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n",
                          originPort, originPort);
    requestLen = snprintf(request, sizeof request,
                          "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                          "User-Agent: egressproxy-bench\r\nContent-Length: %d\r\n\r\n",
                          body ? "POST" : "GET", path, originPort, body);
    memset(request + requestLen, 'x', body);
    requestLen += body;

    epfd = epoll_create1(0);
    struct conn *all = calloc(conns, sizeof *all);
    uint64_t t0 = now_us(), end = t0 + (uint64_t)seconds * 1000000;
    for (int i = 0; i < conns; i++) start(&all[i]);
    struct epoll_event evs[256];
    while (now_us() < end) {
        int n = epoll_wait(epfd, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            int fd = c->fd;
            if (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) writable(c);
            if (c->fd == fd && c->state != CONNECTING &&
                evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                readable(c);
        }
    }
    uint64_t took = now_us() - t0;
    printf("BENCHJSON {\"requests\":%llu,\"duration_us\":%llu,\"errors\":%llu,"
           "\"lat_p50_us\":%llu,\"lat_p90_us\":%llu,\"lat_p99_us\":%llu,\"conns\":%d}\n",
           (unsigned long long)done, (unsigned long long)took,
           (unsigned long long)errors, (unsigned long long)percentile(50),
           (unsigned long long)percentile(90), (unsigned long long)percentile(99), conns);
    return 0;
}
