/*
 * subclient: N WebSocket subscribers in one thread, for fan-out benchmarks.
 *
 *   subclient --url ws://127.0.0.1:PORT/api/realtime?token=test -n 1000 [--topics T]
 *             [--first I] [--pattern PATTERN] [--prefix bench/] [--concurrency 200]
 *             [--connect-timeout 30] [--no-subscribe]
 *
 * Opens N connections with non-blocking connects (at most --concurrency handshakes in
 * flight), does the RFC 6455 client handshake (random key, checks the 101 and
 * Sec-WebSocket-Accept), sends {"action":"subscribe","topics":[...],"id":"s"} as a masked
 * text frame and waits for the "subscribed" reply. Subscriber i takes topic
 * PREFIX + ((FIRST + i) % T), zero-padded to the width of T - 1 (as bench/fanout/driver.py names
 * them), or the --pattern. Then it reads as fast as the kernel delivers: one read into one
 * large buffer per wakeup, every frame of that read stamped with the same CLOCK_MONOTONIC
 * time. For each text frame it finds the "t": number (the publisher's scheduled
 * CLOCK_MONOTONIC ns, quoted or not) and adds now - t to a log-linear histogram: exact
 * microseconds below 1.024 ms, then 512 sub-buckets per power of two (under 0.1 % error),
 * the same buckets as bench/common/histogram.py, so the driver can merge them.
 *
 * Control over stdin/stdout, one line each:
 *   prints "ready OK FAILED" once every connection is subscribed or has failed;
 *   "count"  -> "count FRAMES"  (text frames since the last reset; cheap, for polling);
 *   "reset"  clears frame, byte, latency and close counters;
 *   "report" -> one JSON object (see report());
 *   "quit" or end of input closes everything and exits.
 *
 * Plain C11 and Linux epoll, no libraries: SHA-1 and base64 are implemented below.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define READ_BUF (1u << 20)      /* one read per wakeup lands here */
#define MAX_REST (READ_BUF / 2)  /* a partial frame kept between reads, at most */
#define MAX_HEAD 8192            /* handshake answer */
#define SUB_LOG2 9
#define LINEAR_US (1 << (SUB_LOG2 + 1))
#define HIST_SIZE (64 << SUB_LOG2)
#define STDIN_TAG UINT64_MAX

enum state { C_IDLE, C_CONNECTING, C_HANDSHAKE, C_SUBSCRIBING, C_OPEN, C_CLOSED, C_FAILED };

struct conn {
    int fd;
    uint8_t state;
    uint32_t index;
    double deadline;        /* for connect, handshake and subscribe */
    char *rest;             /* bytes of an unfinished frame (or of the handshake answer) */
    uint32_t rest_len, rest_cap;
    char *out;              /* bytes not yet written */
    uint32_t out_len;
    char accept[32];        /* the Sec-WebSocket-Accept we expect */
};

/* ---- options and totals ------------------------------------------------------------- */

static char o_host[256] = "127.0.0.1", o_port[16] = "8080", o_path[2048] = "/";
static char o_prefix[256] = "bench/", o_pattern[256] = "";
static long o_n = 1, o_first = 0, o_topics = 1, o_concurrency = 200;
static double o_connect_timeout = 30.0;
static int o_subscribe = 1;

static struct conn *conns;
static int ep;
static long next_conn, in_progress, n_ok, n_failed;
static int ready_said;
static uint64_t hist[HIST_SIZE];
static uint64_t frames, text_frames, bytes_in, bad_t, pings, max_ns, samples;
static uint64_t closes[5000];          /* close frames seen, by code (>= 5000: slot 0) */
static uint64_t eofs;                  /* connections lost after they were open */
static struct { char what[64]; uint64_t count; } errs[32];
static int n_errs;
static struct timespec reset_at;
static unsigned char *rbuf;
static uint64_t rng = 0x9E3779B97F4A7C15ull;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t next_rand(void) { /* xorshift64*: masking keys need not be secret here */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1Dull;
}

static void random_bytes(unsigned char *p, size_t n) {
    FILE *f = fopen("/dev/urandom", "rb");
    size_t got = f ? fread(p, 1, n, f) : 0;
    if (f)
        fclose(f);
    for (size_t i = got; i < n; i++)
        p[i] = (unsigned char)next_rand();
}

/* ---- SHA-1 (FIPS 180-4) and base64, for the handshake only -------------------------- */

static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1(const unsigned char *msg, size_t len, unsigned char out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t total = ((len + 8) / 64 + 1) * 64;
    unsigned char *m = calloc(total, 1);
    if (!m)
        abort();
    memcpy(m, msg, len);
    m[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++)
        m[total - 1 - i] = (unsigned char)(bits >> (8 * i));
    for (size_t off = 0; off < total; off += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = (uint32_t)m[off + 4 * i] << 24 | (uint32_t)m[off + 4 * i + 1] << 16 |
                   (uint32_t)m[off + 4 * i + 2] << 8 | m[off + 4 * i + 3];
        for (int i = 16; i < 80; i++)
            w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) {
                f = (b & c) | (~b & d);
                k = 0x5A827999;
            } else if (i < 40) {
                f = b ^ c ^ d;
                k = 0x6ED9EBA1;
            } else if (i < 60) {
                f = (b & c) | (b & d) | (c & d);
                k = 0x8F1BBCDC;
            } else {
                f = b ^ c ^ d;
                k = 0xCA62C1D6;
            }
            uint32_t t = rol(a, 5) + f + e + k + w[i];
            e = d;
            d = c;
            c = rol(b, 30);
            b = a;
            a = t;
        }
        h[0] += a;
        h[1] += b;
        h[2] += c;
        h[3] += d;
        h[4] += e;
    }
    free(m);
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 4; j++)
            out[4 * i + j] = (unsigned char)(h[i] >> (24 - 8 * j));
}

static void base64(const unsigned char *in, size_t n, char *out) {
    static const char abc[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = abc[(v >> 18) & 63];
        out[o++] = abc[(v >> 12) & 63];
        out[o++] = i + 1 < n ? abc[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? abc[v & 63] : '=';
    }
    out[o] = 0;
}

/* ---- histogram ---------------------------------------------------------------------- */

static void record(uint64_t lat_ns) {
    uint64_t us = lat_ns / 1000;
    size_t idx;
    if (us < LINEAR_US) {
        idx = (size_t)us;
    } else {
        int shift = (64 - __builtin_clzll(us)) - (SUB_LOG2 + 1);
        idx = ((size_t)shift << SUB_LOG2) + (size_t)(us >> shift);
    }
    hist[idx]++;
    samples++;
    if (lat_ns > max_ns)
        max_ns = lat_ns;
}

static double bucket_value(size_t idx) { /* the bucket's midpoint, in microseconds */
    if (idx < LINEAR_US)
        return (double)idx;
    int shift = (int)(idx >> SUB_LOG2) - 1;
    uint64_t low = (uint64_t)(idx - ((size_t)shift << SUB_LOG2)) << shift;
    return (double)low + (double)((1ull << shift) - 1) / 2.0;
}

static double percentile_ms(double q) {
    if (!samples)
        return -1;
    uint64_t rank = (uint64_t)(q * (double)samples);
    if ((double)rank < q * (double)samples)
        rank++;
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < HIST_SIZE; i++) {
        seen += hist[i];
        if (seen >= rank)
            return bucket_value(i) / 1000.0;
    }
    return (double)max_ns / 1e6;
}

/* ---- connections -------------------------------------------------------------------- */

static void note_error(const char *what) {
    for (int i = 0; i < n_errs; i++)
        if (!strcmp(errs[i].what, what)) {
            errs[i].count++;
            return;
        }
    if (n_errs < 32) {
        snprintf(errs[n_errs].what, sizeof errs[n_errs].what, "%s", what);
        errs[n_errs++].count = 1;
    }
}

static void release(struct conn *c) {
    if (c->fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    free(c->rest);
    free(c->out);
    c->rest = c->out = NULL;
    c->rest_len = c->rest_cap = c->out_len = 0;
}

static void settle(void); /* a connection reached OPEN or FAILED: start more, maybe ready */

static void fail(struct conn *c, const char *why) {
    int was_setup = c->state < C_OPEN;
    if (was_setup) {
        note_error(why);
        n_failed++;
        in_progress--;
    } else {
        eofs++;
    }
    c->state = was_setup ? C_FAILED : C_CLOSED;
    release(c);
    if (was_setup)
        settle();
}

static void want_write(struct conn *c, int on) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.u64 = c->index};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void send_bytes(struct conn *c, const void *p, size_t n) {
    if (c->out_len == 0) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w == (ssize_t)n)
            return;
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            fail(c, "write failed");
            return;
        }
        if (w < 0)
            w = 0;
        p = (const char *)p + w;
        n -= (size_t)w;
    }
    char *grown = realloc(c->out, c->out_len + n);
    if (!grown)
        abort();
    c->out = grown;
    memcpy(c->out + c->out_len, p, n);
    c->out_len += (uint32_t)n;
    want_write(c, 1);
}

static void flush_out(struct conn *c) {
    ssize_t w = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            fail(c, "write failed");
        return;
    }
    memmove(c->out, c->out + w, c->out_len - (size_t)w);
    c->out_len -= (uint32_t)w;
    if (!c->out_len)
        want_write(c, 0);
}

/* A masked client frame (RFC 6455 5.3): every byte of the payload XOR the key. */
static void send_frame(struct conn *c, int opcode, const unsigned char *payload, size_t n) {
    unsigned char frame[16 + 1024];
    if (n > 1024)
        return;
    size_t h = 0;
    frame[h++] = (unsigned char)(0x80 | opcode);
    if (n < 126) {
        frame[h++] = (unsigned char)(0x80 | n);
    } else {
        frame[h++] = 0x80 | 126;
        frame[h++] = (unsigned char)(n >> 8);
        frame[h++] = (unsigned char)n;
    }
    uint32_t key = (uint32_t)next_rand();
    unsigned char *k = frame + h;
    memcpy(k, &key, 4);
    h += 4;
    for (size_t i = 0; i < n; i++)
        frame[h + i] = payload[i] ^ k[i & 3];
    send_bytes(c, frame, h + n);
}

static void topic_of(long i, char *out, size_t cap) {
    if (o_pattern[0]) {
        snprintf(out, cap, "%s", o_pattern);
        return;
    }
    int width = snprintf(NULL, 0, "%ld", o_topics > 1 ? o_topics - 1 : 0);
    snprintf(out, cap, "%s%0*ld", o_prefix, width, (o_first + i) % o_topics);
}

static void on_open(struct conn *c) {
    if (!o_subscribe) {
        c->state = C_OPEN;
        n_ok++;
        in_progress--;
        settle();
        return;
    }
    char topic[300], msg[512];
    topic_of(c->index, topic, sizeof topic);
    int n = snprintf(msg, sizeof msg, "{\"action\":\"subscribe\",\"topics\":[\"%s\"],\"id\":\"s\"}",
                     topic);
    c->state = C_SUBSCRIBING;
    send_frame(c, 1, (const unsigned char *)msg, (size_t)n);
}

static void start_conn(struct conn *c, const struct addrinfo *ai) {
    c->fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    in_progress++;
    c->deadline = now_s() + o_connect_timeout;
    if (c->fd < 0) {
        c->state = C_CONNECTING;
        fail(c, errno == EMFILE || errno == ENFILE ? "socket: too many files" : "socket");
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->state = C_CONNECTING;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u64 = c->index};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    if (connect(c->fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS)
        fail(c, errno == EADDRNOTAVAIL ? "connect: no free port" : "connect refused");
}

static const struct addrinfo *target;

static void settle(void) {
    static int busy; /* a connect that fails at once settles again: loop, don't recurse */
    if (busy)
        return;
    busy = 1;
    while (next_conn < o_n && in_progress < o_concurrency)
        start_conn(&conns[next_conn++], target);
    busy = 0;
    if (!ready_said && n_ok + n_failed == o_n) {
        ready_said = 1;
        printf("ready %ld %ld\n", n_ok, n_failed);
        fflush(stdout);
    }
}

static void send_handshake(struct conn *c) {
    unsigned char raw[16], digest[20];
    char key[32], req[4096], cat[96];
    random_bytes(raw, sizeof raw);
    base64(raw, sizeof raw, key);
    int n = snprintf(cat, sizeof cat, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", key);
    sha1((const unsigned char *)cat, (size_t)n, digest);
    base64(digest, sizeof digest, c->accept);
    n = snprintf(req, sizeof req,
                 "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n",
                 o_path, o_host, o_port, key);
    c->state = C_HANDSHAKE;
    send_bytes(c, req, (size_t)n);
}

/* The handshake answer: a 101 whose Sec-WebSocket-Accept matches. Returns the bytes of
 * the head consumed, 0 if it is incomplete, -1 if the connection failed. */
static long check_101(struct conn *c, const char *p, size_t n) {
    const char *end = memmem(p, n, "\r\n\r\n", 4);
    if (!end) {
        if (n > MAX_HEAD)
            fail(c, "handshake: answer too long");
        return 0;
    }
    if (n < 12 || memcmp(p, "HTTP/1.1 101", 12) != 0) {
        char why[64];
        snprintf(why, sizeof why, "handshake: HTTP %.3s", n >= 12 ? p + 9 : "???");
        fail(c, why);
        return -1;
    }
    const char *line = p;
    int accepted = 0;
    while (line < end) {
        const char *eol = memmem(line, (size_t)(end + 2 - line), "\r\n", 2);
        static const char name[] = "sec-websocket-accept:";
        if (eol && (size_t)(eol - line) > sizeof name - 1 &&
            !strncasecmp(line, name, sizeof name - 1)) {
            const char *v = line + sizeof name - 1;
            while (v < eol && (*v == ' ' || *v == '\t'))
                v++;
            size_t len = (size_t)(eol - v);
            while (len && (v[len - 1] == ' ' || v[len - 1] == '\t'))
                len--;
            accepted = len == strlen(c->accept) && !memcmp(v, c->accept, len);
        }
        if (!eol)
            break;
        line = eol + 2;
    }
    if (!accepted) {
        fail(c, "handshake: bad Sec-WebSocket-Accept");
        return -1;
    }
    on_open(c);
    return c->fd < 0 ? -1 : (long)(end + 4 - p);
}

static void on_text(struct conn *c, const unsigned char *p, size_t n, uint64_t now) {
    if (c->state == C_SUBSCRIBING) {
        /* The reply's type comes first, so look only near the start (a message text
         * further on may mention anything). */
        size_t head = n < 32 ? n : 32;
        if (memmem(p, head, "\"error\"", 7)) {
            fail(c, "subscribe: error reply");
        } else if (memmem(p, head, "\"subscribed\"", 12)) {
            const char *e = memmem(p, n, "\"errors\":[", 10);
            if (e && (size_t)((const unsigned char *)e - p) + 10 < n && e[10] != ']') {
                fail(c, "subscribe refused");
                return;
            }
            c->state = C_OPEN;
            n_ok++;
            in_progress--;
            settle();
        }
        return;
    }
    text_frames++;
    const unsigned char *t = memmem(p, n, "\"t\":", 4);
    if (!t) {
        bad_t++;
        return;
    }
    const unsigned char *q = t + 4, *end = p + n;
    if (q < end && *q == '"')
        q++;
    uint64_t v = 0;
    int digits = 0;
    while (q < end && *q >= '0' && *q <= '9') {
        v = v * 10 + (uint64_t)(*q++ - '0');
        digits++;
    }
    if (!digits) {
        bad_t++;
        return;
    }
    record(now > v ? now - v : 0);
}

/* Walk the frames in p[0..n): returns bytes consumed (a partial frame stays), -1 if the
 * connection is gone. */
static long parse_frames(struct conn *c, const unsigned char *p, size_t n, uint64_t now) {
    size_t pos = 0;
    while (n - pos >= 2) {
        unsigned b0 = p[pos], b1 = p[pos + 1];
        uint64_t len = b1 & 0x7F;
        size_t h = 2;
        if (b1 & 0x80) {
            fail(c, "masked server frame");
            return -1;
        }
        if (len == 126) {
            if (n - pos < 4)
                break;
            len = (uint64_t)p[pos + 2] << 8 | p[pos + 3];
            h = 4;
        } else if (len == 127) {
            if (n - pos < 10)
                break;
            len = 0;
            for (int i = 0; i < 8; i++)
                len = len << 8 | p[pos + 2 + i];
            h = 10;
        }
        if (len > MAX_REST - 16) {
            fail(c, "frame too large");
            return -1;
        }
        if (n - pos < h + len)
            break;
        const unsigned char *payload = p + pos + h;
        frames++;
        switch (b0 & 0x0F) {
        case 1: /* text (fragments of a text message carry no "t" of their own) */
            on_text(c, payload, (size_t)len, now);
            if (c->fd < 0)
                return -1;
            break;
        case 8: { /* close: count the code, answer it, hang up */
            unsigned code = len >= 2 ? (unsigned)payload[0] << 8 | payload[1] : 1005;
            closes[code < 5000 ? code : 0]++;
            send_frame(c, 8, payload, len >= 2 ? 2 : 0);
            if (c->fd < 0)
                return -1;
            if (c->state < C_OPEN) {
                fail(c, "closed during setup");
            } else {
                c->state = C_CLOSED;
                release(c);
            }
            return -1;
        }
        case 9: /* ping: pong with the same payload */
            pings++;
            send_frame(c, 10, payload, (size_t)len);
            if (c->fd < 0)
                return -1;
            break;
        default:
            break;
        }
        pos += h + (size_t)len;
    }
    return (long)pos;
}

static void on_readable(struct conn *c) {
    size_t have = c->rest_len;
    if (have)
        memcpy(rbuf, c->rest, have);
    ssize_t r = recv(c->fd, rbuf + have, READ_BUF - have, 0);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        fail(c, c->state == C_HANDSHAKE ? "handshake: connection closed" : "connection lost");
        return;
    }
    if (r < 0)
        return;
    uint64_t now = now_ns();
    bytes_in += (uint64_t)r;
    size_t n = have + (size_t)r;
    size_t pos = 0;
    if (c->state == C_HANDSHAKE) {
        long used = check_101(c, (const char *)rbuf, n);
        if (used < 0)
            return;
        if (used == 0) {
            pos = 0;
            goto keep;
        }
        pos = (size_t)used;
    }
    {
        long used = parse_frames(c, rbuf + pos, n - pos, now);
        if (used < 0)
            return;
        pos += (size_t)used;
    }
keep:
    c->rest_len = (uint32_t)(n - pos);
    if (c->rest_len) {
        if (c->rest_len > c->rest_cap) {
            c->rest_cap = c->rest_len < 512 ? 512 : c->rest_len;
            free(c->rest);
            c->rest = malloc(c->rest_cap);
            if (!c->rest)
                abort();
        }
        memcpy(c->rest, rbuf + pos, c->rest_len);
    }
}

static void on_writable(struct conn *c) {
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            fail(c, err == ECONNREFUSED ? "connect refused" : "connect failed");
            return;
        }
        want_write(c, 0);
        send_handshake(c);
        return;
    }
    if (c->out_len)
        flush_out(c);
}

/* ---- control and report ------------------------------------------------------------- */

static void reset(void) {
    memset(hist, 0, sizeof hist);
    memset(closes, 0, sizeof closes);
    frames = text_frames = bytes_in = bad_t = pings = max_ns = samples = eofs = 0;
    clock_gettime(CLOCK_MONOTONIC, &reset_at);
}

static void print_ms(const char *key, double v, int last) {
    if (v < 0)
        printf("\"%s\":null%s", key, last ? "" : ",");
    else
        printf("\"%s\":%.3f%s", key, v, last ? "" : ",");
}

static void report(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    double sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double since = (double)(ts.tv_sec - reset_at.tv_sec) + (ts.tv_nsec - reset_at.tv_nsec) / 1e9;
    long open_now = 0;
    for (long i = 0; i < o_n; i++)
        open_now += conns[i].state == C_OPEN;
    printf("{\"connections\":{\"ok\":%ld,\"failed\":%ld,\"open\":%ld,\"lost\":%" PRIu64
           ",\"errors\":{",
           n_ok, n_failed, open_now, eofs);
    for (int i = 0; i < n_errs; i++)
        printf("%s\"%s\":%" PRIu64, i ? "," : "", errs[i].what, errs[i].count);
    printf("}},\"frames\":%" PRIu64 ",\"text_frames\":%" PRIu64 ",\"bytes\":%" PRIu64
           ",\"no_t\":%" PRIu64 ",\"pings\":%" PRIu64 ",\"samples\":%" PRIu64
           ",\"since_reset_s\":%.3f,\"latency_ms\":{",
           frames, text_frames, bytes_in, bad_t, pings, samples, since);
    print_ms("p50", percentile_ms(0.50), 0);
    print_ms("p90", percentile_ms(0.90), 0);
    print_ms("p99", percentile_ms(0.99), 0);
    print_ms("p99.9", percentile_ms(0.999), 0);
    print_ms("max", samples ? (double)max_ns / 1e6 : -1, 1);
    printf("},\"cpu_s\":{\"user\":%.3f,\"sys\":%.3f},\"closes\":{", user, sys);
    int first = 1;
    for (unsigned i = 0; i < 5000; i++)
        if (closes[i]) {
            printf("%s\"%u\":%" PRIu64, first ? "" : ",", i, closes[i]);
            first = 0;
        }
    printf("},\"hist\":[");
    first = 1;
    for (size_t i = 0; i < HIST_SIZE; i++)
        if (hist[i]) {
            printf("%s[%zu,%" PRIu64 "]", first ? "" : ",", i, hist[i]);
            first = 0;
        }
    printf("]}\n");
    fflush(stdout);
}

static char line[256];
static size_t line_len;

/* Returns 0 when the driver said quit (or closed our input). */
static int on_stdin(void) {
    ssize_t r = read(0, line + line_len, sizeof line - 1 - line_len);
    if (r <= 0)
        return 0;
    line_len += (size_t)r;
    char *nl;
    while ((nl = memchr(line, '\n', line_len))) {
        *nl = 0;
        if (!strcmp(line, "report")) {
            report();
        } else if (!strcmp(line, "reset")) {
            reset();
        } else if (!strcmp(line, "count")) {
            printf("count %" PRIu64 "\n", text_frames);
            fflush(stdout);
        } else if (!strcmp(line, "quit")) {
            return 0;
        }
        size_t used = (size_t)(nl + 1 - line);
        memmove(line, nl + 1, line_len - used);
        line_len -= used;
    }
    if (line_len == sizeof line - 1)
        line_len = 0; /* an overlong line: drop it */
    return 1;
}

/* ---- main --------------------------------------------------------------------------- */

static int parse_url(const char *url) {
    const char *p = url;
    if (!strncmp(p, "ws://", 5))
        p += 5;
    else
        return -1;
    const char *slash = strchr(p, '/');
    const char *hostend = slash ? slash : p + strlen(p);
    const char *colon = memchr(p, ':', (size_t)(hostend - p));
    size_t hl = (size_t)((colon ? colon : hostend) - p);
    if (!hl || hl >= sizeof o_host)
        return -1;
    memcpy(o_host, p, hl);
    o_host[hl] = 0;
    if (colon) {
        size_t pl = (size_t)(hostend - colon - 1);
        if (!pl || pl >= sizeof o_port)
            return -1;
        memcpy(o_port, colon + 1, pl);
        o_port[pl] = 0;
    } else {
        strcpy(o_port, "80");
    }
    snprintf(o_path, sizeof o_path, "%s", slash ? slash : "/");
    return 0;
}

static void usage(void) {
    fprintf(stderr,
            "usage: subclient --url ws://HOST:PORT/PATH -n N [--first I] [--topics T]\n"
            "                 [--prefix P] [--pattern PAT] [--concurrency C]\n"
            "                 [--connect-timeout S] [--no-subscribe]\n");
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--no-subscribe")) {
            o_subscribe = 0;
            continue;
        }
        if (!v)
            usage();
        i++;
        if (!strcmp(a, "--url")) {
            if (parse_url(v))
                usage();
        } else if (!strcmp(a, "-n")) {
            o_n = strtol(v, NULL, 10);
        } else if (!strcmp(a, "--first")) {
            o_first = strtol(v, NULL, 10);
        } else if (!strcmp(a, "--topics")) {
            o_topics = strtol(v, NULL, 10);
        } else if (!strcmp(a, "--prefix")) {
            snprintf(o_prefix, sizeof o_prefix, "%s", v);
        } else if (!strcmp(a, "--pattern")) {
            snprintf(o_pattern, sizeof o_pattern, "%s", v);
        } else if (!strcmp(a, "--concurrency")) {
            o_concurrency = strtol(v, NULL, 10);
        } else if (!strcmp(a, "--connect-timeout")) {
            o_connect_timeout = strtod(v, NULL);
        } else {
            usage();
        }
    }
    if (o_n < 0 || o_topics < 1 || o_concurrency < 1)
        usage();

    /* One descriptor per connection: raise the soft limit as far as the hard one. */
    struct rlimit rl;
    if (!getrlimit(RLIMIT_NOFILE, &rl) && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (!getrlimit(RLIMIT_NOFILE, &rl) && (rlim_t)o_n + 16 > rl.rlim_cur)
        fprintf(stderr, "subclient: RLIMIT_NOFILE %lu is below %ld connections\n",
                (unsigned long)rl.rlim_cur, o_n);

    unsigned char seed[8];
    random_bytes(seed, sizeof seed);
    memcpy(&rng, seed, sizeof rng);
    rng |= 1;

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res;
    int gai = getaddrinfo(o_host, o_port, &hints, &res);
    if (gai) {
        fprintf(stderr, "subclient: %s: %s\n", o_host, gai_strerror(gai));
        return 1;
    }
    target = res;
    rbuf = malloc(READ_BUF);
    conns = calloc((size_t)(o_n ? o_n : 1), sizeof *conns);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (!rbuf || !conns || ep < 0) {
        perror("subclient");
        return 1;
    }
    for (long i = 0; i < o_n; i++) {
        conns[i].fd = -1;
        conns[i].index = (uint32_t)i;
    }
    struct epoll_event sev = {.events = EPOLLIN, .data.u64 = STDIN_TAG};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev);
    reset();
    settle();

    struct epoll_event evs[1024];
    double next_sweep = now_s() + 0.2;
    int running = 1;
    while (running) {
        int k = epoll_wait(ep, evs, 1024, 200);
        if (k < 0 && errno != EINTR) {
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < k; i++) {
            if (evs[i].data.u64 == STDIN_TAG) {
                running = on_stdin();
                continue;
            }
            struct conn *c = &conns[evs[i].data.u64];
            if (c->fd < 0)
                continue; /* released earlier in this batch */
            if ((evs[i].events & EPOLLOUT) || (c->state == C_CONNECTING &&
                                               (evs[i].events & (EPOLLERR | EPOLLHUP)))) {
                on_writable(c);
                if (c->fd < 0)
                    continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c);
        }
        double t = now_s();
        if (t >= next_sweep) { /* time out connections stuck in setup */
            next_sweep = t + 0.2;
            for (long i = 0; i < next_conn; i++) {
                struct conn *c = &conns[i];
                if (c->state >= C_CONNECTING && c->state < C_OPEN && c->fd >= 0 &&
                    t > c->deadline)
                    fail(c, c->state == C_CONNECTING    ? "connect timeout"
                            : c->state == C_HANDSHAKE ? "handshake timeout"
                                                      : "subscribe timeout");
            }
        }
    }
    for (long i = 0; i < o_n; i++)
        if (conns[i].fd >= 0)
            release(&conns[i]);
    freeaddrinfo(res);
    return 0;
}
