/*
 * The floor: the least a userspace recv/send proxy can cost on this kernel.
 *
 * Not a product and not our design: a yardstick for benches/peers.py. One
 * epoll loop per thread, edge-triggered, SO_REUSEPORT listeners, recv into
 * a 16 KiB buffer and send at once (a short recv means drained: no read for
 * EAGAIN), no timers, no retries, no metrics, no limits. Whatever any real
 * proxy costs above this row is its own work; what this row costs is the
 * kernel's (loopback TCP, wake-ups, epoll).
 *
 * Usage: [FLOOR_SHARED=1] floor PORT THREADS [LISTEN BACKEND]
 *   FLOOR_SHARED=1 shares one listener a port among the threads, HAProxy's
 *   way, instead of one SO_REUSEPORT listener a thread (see below);
 *   forwards LISTEN:PORT   -> BACKEND:18080 (the bench's HTTP backend),
 *            LISTEN:PORT+1 -> BACKEND:15201 (its iperf3 backend)
 *   and      LISTEN:PORT+2 -> BACKEND:16379 (its redis backend);
 *   LISTEN and BACKEND are IPv4 addresses, 127.0.0.1 both by default.
 * Build: cc -O2 -pthread -o floor benches/floor.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK 16384
#define NPORTS 3
static const int BACKENDS[NPORTS] = {18080, 15201, 16379};
static int port;
/* FLOOR_SHARED=1: one listener per port shared by every thread, in each
 * thread's epoll with EPOLLEXCLUSIVE, level-triggered, at most MAXACCEPT
 * accepts a wake-up (HAProxy's way); otherwise one SO_REUSEPORT listener
 * per thread. */
static int shared, shared_ls[NPORTS];
#define MAXACCEPT 16
static struct in_addr listen_ip, backend_ip;

/* One proxied connection: fd[0] the client, fd[1] the backend. Direction d
 * reads fd[d] and writes fd[!d]; what fd[!d] did not take waits in pend[d]. */
struct conn {
    int fd[2], eof[2], dead;
    char *pend[2];
    int plen[2], poff[2];
    struct conn *next_dead;
};
/* epoll data: a connection end (conn pointer | which end) or a listener. */
#define END(c, i) ((void *)((unsigned long)(c) | (unsigned long)(i)))

static __thread struct conn *graveyard; /* per thread: each loop frees its own */

static void kill_conn(struct conn *c) {
    if (c->dead) return;
    c->dead = 1;
    close(c->fd[0]);
    close(c->fd[1]);
    c->next_dead = graveyard;
    graveyard = c;
}

/* Moves what direction d has: first what is pending, then fresh reads.
 * hup: the event said the peer has shut down its side; a short read is then
 * not the end (edge-triggered: no further event will come for the FIN), so
 * read on to the EOF and pass it on now, not when an ACK happens to wake
 * the other end. */
static void pump(struct conn *c, int d, int hup) {
    int src = c->fd[d], dst = c->fd[!d];
    static __thread char buf[CHUNK];
    while (c->plen[d] > 0) {
        ssize_t m = send(dst, c->pend[d] + c->poff[d], c->plen[d], MSG_NOSIGNAL);
        if (m < 0) {
            if (errno != EAGAIN) kill_conn(c);
            return;
        }
        c->poff[d] += m;
        c->plen[d] -= m;
    }
    while (!c->eof[d]) {
        ssize_t r = recv(src, buf, CHUNK, 0);
        if (r < 0) {
            if (errno != EAGAIN) kill_conn(c);
            return;
        }
        if (r == 0) {
            c->eof[d] = 1;
            if (c->eof[!d] && c->plen[!d] == 0) kill_conn(c);
            else shutdown(dst, SHUT_WR);
            return;
        }
        ssize_t m = send(dst, buf, r, MSG_NOSIGNAL);
        if (m < 0) {
            if (errno != EAGAIN) {
                kill_conn(c);
                return;
            }
            m = 0;
        }
        if (m < r) { /* wait for EPOLLOUT on dst */
            if (!c->pend[d]) c->pend[d] = malloc(CHUNK);
            memcpy(c->pend[d], buf + m, r - m);
            c->plen[d] = r - m;
            c->poff[d] = 0;
            return;
        }
        if (r < CHUNK && !hup) return; /* drained */
    }
}

static int listen_on(int p) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(p)};
    a.sin_addr = listen_ip;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (!shared) setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (bind(s, (void *)&a, sizeof a) || listen(s, 4096)) {
        perror("floor: bind");
        exit(1);
    }
    return s;
}

static void accept_all(int ep, int ls, int backend) {
    struct sockaddr_in b = {.sin_family = AF_INET, .sin_port = htons(backend)};
    b.sin_addr = backend_ip;
    int one = 1;
    for (int n = 0; !shared || n < MAXACCEPT; n++) {
        int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
        if (c < 0) return;
        int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (s < 0 || (connect(s, (void *)&b, sizeof b) && errno != EINPROGRESS)) {
            close(c);
            if (s >= 0) close(s);
            continue;
        }
        struct conn *k = calloc(1, sizeof *k);
        k->fd[0] = c;
        k->fd[1] = s;
        for (int i = 0; i < 2; i++) {
            struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                     .data.ptr = END(k, i)};
            epoll_ctl(ep, EPOLL_CTL_ADD, k->fd[i], &ev);
        }
    }
}

static void *worker(void *arg) {
    (void)arg;
    int ep = epoll_create1(0), ls[NPORTS];
    for (int i = 0; i < NPORTS; i++) {
        ls[i] = shared ? shared_ls[i] : listen_on(port + i);
        /* listeners carry a small integer, never a (16-byte aligned) conn */
        struct epoll_event ev = {.events = EPOLLIN | (shared ? EPOLLEXCLUSIVE : 0),
                                 .data.u64 = 2 + i};
        epoll_ctl(ep, EPOLL_CTL_ADD, ls[i], &ev);
    }
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            unsigned long v = evs[i].data.u64;
            if (v >= 2 && v < 2 + NPORTS) {
                accept_all(ep, ls[v - 2], BACKENDS[v - 2]);
                continue;
            }
            struct conn *c = (struct conn *)(v & ~1UL);
            int end = v & 1;
            unsigned e = evs[i].events;
            if (!c->dead && (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
                pump(c, end, e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)); /* its direction */
            if (!c->dead && (e & EPOLLOUT))
                pump(c, !end, 0); /* end is writable: what was waiting for it */
        }
        while (graveyard) { /* freed after the batch: later events may name it */
            struct conn *c = graveyard;
            graveyard = c->next_dead;
            free(c->pend[0]);
            free(c->pend[1]);
            free(c);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    listen_ip.s_addr = backend_ip.s_addr = htonl(INADDR_LOOPBACK);
    if ((argc != 3 && argc != 5) ||
        (argc == 5 && (inet_pton(AF_INET, argv[3], &listen_ip) != 1 ||
                       inet_pton(AF_INET, argv[4], &backend_ip) != 1))) {
        fprintf(stderr, "usage: floor PORT THREADS [LISTEN BACKEND]\n");
        return 2;
    }
    port = atoi(argv[1]);
    int threads = atoi(argv[2]);
    shared = getenv("FLOOR_SHARED") && atoi(getenv("FLOOR_SHARED"));
    if (shared)
        for (int i = 0; i < NPORTS; i++) shared_ls[i] = listen_on(port + i);
    pthread_t t;
    for (int i = 1; i < threads; i++) pthread_create(&t, NULL, worker, NULL);
    worker(NULL);
}
