/*
 * The io_uring floor: benches/floor.c's proxy with io_uring in place of
 * epoll, to decide whether an io_uring data path could pay (issue: ship one
 * only at >= 1.1x the floor on keep-alive or new connections).
 *
 * Not a product: a yardstick for benches/peers.py, as minimal as floor.c
 * and using what io_uring offers a proxy on this kernel. One ring per
 * thread (SINGLE_ISSUER, DEFER_TASKRUN: completions run only when the thread
 * asks, in one io_uring_enter that also submits), SO_REUSEPORT listeners,
 * multishot accept, multishot recv into a ring of provided 16 KiB buffers,
 * each received buffer sent as it is (one send in flight per direction,
 * the rest of a short send sent next), connect and close as ring
 * operations. socket, TCP_NODELAY and shutdown stay syscalls (the ring's
 * shutdown always runs in an io-wq worker thread: a thread hop per
 * connection). EOF half-closes like floor.c. No timers, retries, metrics or
 * limits. Whatever this row gains on the floor's row is what io_uring saves.
 *
 * Usage: floor_uring PORT THREADS [LISTEN BACKEND], as floor.c:
 *   forwards LISTEN:PORT   -> BACKEND:18080 (the bench's HTTP backend),
 *            LISTEN:PORT+1 -> BACKEND:15201 (its iperf3 backend)
 *   and      LISTEN:PORT+2 -> BACKEND:16379 (its redis backend);
 *   LISTEN and BACKEND are IPv4 addresses, 127.0.0.1 both by default.
 * Build: cc -O2 -pthread -o floor_uring benches/floor_uring.c -luring
 *   (liburing >= 2.3; kernel >= 6.1 for DEFER_TASKRUN, else it does without)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK 16384
/* Provided buffers per thread, a power of two. The kernel takes them in
 * ring order, so a big ring cycles through cold memory: 1,024 (16 MiB) cost
 * a quarter of one-stream bulk throughput; 64 (1 MiB) stay in cache. A recv
 * that finds none ends and waits for a quarter of them to come back. */
#ifndef NBUF
#define NBUF 64
#endif
#define NPORTS 3
static const int BACKENDS[NPORTS] = {18080, 15201, 16379};
static int port;
static struct in_addr listen_ip;
static struct sockaddr_in backend[NPORTS]; /* BACKENDS on BACKEND, set by main */

/* One proxied connection: fd[0] the client, fd[1] the backend. Direction d
 * receives from fd[d] and sends to fd[!d]; received buffers wait in a queue
 * (head..tail, linked through next[]) until sent, the head at offset off. */
struct conn {
    int fd[2], refs, eof[2], sending[2], dead;
    int head[2], tail[2], off[2];
};
/* user_data: conn pointer | op << 1 | direction (accept: listener << 4 |
 * op << 1); 0 for fire-and-forget. */
enum { ACCEPT = 1, CONNECT, RECV, SEND };
#define UD(c, op, d) ((unsigned long)(c) | (op) << 1 | (d))

static __thread struct io_uring ring;
static __thread struct io_uring_buf_ring *br;
static __thread char *bufs;
static __thread int next[NBUF], len[NBUF], nfree, nadd;
static __thread unsigned long *starved; /* recvs that found no buffer: UD */
static __thread int nstarved, capstarved;
static __thread int ls[NPORTS];

static struct io_uring_sqe *sqe_for(unsigned long ud) {
    struct io_uring_sqe *s;
    while (!(s = io_uring_get_sqe(&ring))) io_uring_submit(&ring);
    io_uring_sqe_set_data64(s, ud);
    return s;
}

static void recycle(int bid) { /* made visible to the kernel after the batch */
    io_uring_buf_ring_add(br, bufs + (size_t)bid * CHUNK, CHUNK, bid, NBUF - 1, nadd++);
    nfree++;
}

static void arm_accept(int i) {
    io_uring_prep_multishot_accept(sqe_for(UD((unsigned long)i << 4, ACCEPT, 0)), ls[i], NULL, NULL, 0);
}

static void arm_recv(struct conn *c, int d) {
    struct io_uring_sqe *s = sqe_for(UD(c, RECV, d));
    io_uring_prep_recv_multishot(s, c->fd[d], NULL, 0, 0);
    s->flags |= IOSQE_BUFFER_SELECT;
    s->buf_group = 0;
    c->refs++;
}

static void send_head(struct conn *c, int d) {
    int b = c->head[d];
    io_uring_prep_send(sqe_for(UD(c, SEND, d)), c->fd[!d], bufs + (size_t)b * CHUNK + c->off[d],
                       len[b] - c->off[d], MSG_NOSIGNAL);
    c->sending[d] = 1;
    c->refs++;
}

static void ring_close(int fd) { /* no completion wanted */
    struct io_uring_sqe *s = sqe_for(0);
    io_uring_prep_close(s, fd);
    s->flags |= IOSQE_CQE_SKIP_SUCCESS;
}

/* Stops a connection; its fds are closed once no operation names it. */
static void kill_conn(struct conn *c) {
    if (c->dead) return;
    c->dead = 1;
    for (int d = 0; d < 2; d++) /* buffers not being sent go back now */
        for (int b = c->head[d]; b >= 0; b = next[b])
            if (b != c->head[d] || !c->sending[d]) recycle(b);
    if (c->refs) { /* wakes pending recvs (EOF) and sends (EPIPE) */
        shutdown(c->fd[0], SHUT_RDWR);
        shutdown(c->fd[1], SHUT_RDWR);
    }
}

/* Direction d has ended and sent all it had: half-close, or close both. */
static void ended(struct conn *c, int d) {
    if (c->eof[!d] && c->head[!d] < 0) kill_conn(c);
    else shutdown(c->fd[!d], SHUT_WR); /* the ring's would go to a worker thread */
}

static void connected(int lsi, int fd) {
    static const int one = 1;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) {
        close(fd);
        return;
    }
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct conn *c = calloc(1, sizeof *c);
    c->fd[0] = fd;
    c->fd[1] = s;
    c->head[0] = c->head[1] = c->tail[0] = c->tail[1] = -1;
    io_uring_prep_connect(sqe_for(UD(c, CONNECT, 0)), s, (void *)&backend[lsi], sizeof backend[lsi]);
    c->refs++;
}

static void complete(struct io_uring_cqe *cqe) {
    unsigned long ud = cqe->user_data;
    int res = cqe->res, op = (ud >> 1) & 7, d = ud & 1, more = cqe->flags & IORING_CQE_F_MORE;
    struct conn *c = (struct conn *)(ud & ~15UL);
    if (!ud) return; /* a close that failed: nothing to do */
    if (op == ACCEPT) {
        if (res >= 0) connected(ud >> 4, res);
        if (!more) arm_accept(ud >> 4);
        return;
    }
    if (!(op == RECV && more)) c->refs--;
    if (op == CONNECT) {
        if (res < 0) kill_conn(c);
        else arm_recv(c, 0), arm_recv(c, 1);
    } else if (op == RECV && res > 0) {
        int b = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
        nfree--;
        if (c->dead) {
            recycle(b);
        } else {
            len[b] = res;
            next[b] = -1;
            if (c->tail[d] >= 0) next[c->tail[d]] = b;
            else c->head[d] = b;
            c->tail[d] = b;
            if (!c->sending[d]) send_head(c, d);
        }
        if (!more && !c->dead) arm_recv(c, d); /* multishot ended early */
    } else if (op == RECV && res == -ENOBUFS && !c->dead) {
        if (nstarved == capstarved)
            starved = realloc(starved, (capstarved = capstarved * 2 + 64) * sizeof *starved);
        starved[nstarved++] = ud; /* re-armed once buffers come back */
        c->refs++;
    } else if (op == RECV) { /* EOF or error */
        if (res < 0 && res != -ENOBUFS) kill_conn(c);
        else if (!c->dead) {
            c->eof[d] = 1;
            if (c->head[d] < 0) ended(c, d);
        }
    } else if (op == SEND) {
        int b = c->head[d];
        if (res < 0 || c->dead) {
            kill_conn(c); /* returns the queue's buffers but this one */
            recycle(b);
            c->head[d] = -1;
            c->sending[d] = 0;
            goto out;
        }
        c->sending[d] = 0;
        if ((c->off[d] += res) < len[b]) {
            send_head(c, d); /* short send: the rest */
        } else {
            c->off[d] = 0;
            c->head[d] = next[b];
            if (c->head[d] < 0) c->tail[d] = -1;
            recycle(b);
            if (c->head[d] >= 0) send_head(c, d);
            else if (c->eof[d]) ended(c, d);
        }
    }
out:
    if (c->dead && c->refs == 0) {
        ring_close(c->fd[0]);
        ring_close(c->fd[1]);
        free(c);
    }
}

static int listen_on(int p) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(p)};
    a.sin_addr = listen_ip;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (bind(s, (void *)&a, sizeof a) || listen(s, 4096)) {
        perror("floor_uring: bind");
        exit(1);
    }
    return s;
}

static void *worker(void *arg) {
    (void)arg;
    /* the best set this kernel takes, then less (DEFER_TASKRUN: 6.1) */
    static const unsigned flags[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_COOP_TASKRUN,
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN, IORING_SETUP_COOP_TASKRUN, 0};
    int err = -1;
    for (unsigned i = 0; i < 4 && err; i++) {
        struct io_uring_params p = {.flags = flags[i] | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_CQSIZE,
                                    .cq_entries = 16384};
        err = io_uring_queue_init_params(4096, &ring, &p);
    }
    if (err) {
        fprintf(stderr, "floor_uring: io_uring_queue_init: %s\n", strerror(-err));
        exit(1);
    }
    io_uring_register_ring_fd(&ring);
    /* provided buffers: liburing 2.3 has no io_uring_setup_buf_ring yet */
    br = mmap(NULL, NBUF * sizeof(struct io_uring_buf), PROT_READ | PROT_WRITE,
              MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    bufs = malloc((size_t)NBUF * CHUNK);
    io_uring_buf_ring_init(br);
    struct io_uring_buf_reg reg = {.ring_addr = (unsigned long)br, .ring_entries = NBUF, .bgid = 0};
    if ((err = io_uring_register_buf_ring(&ring, &reg, 0))) {
        fprintf(stderr, "floor_uring: io_uring_register_buf_ring: %s\n", strerror(-err));
        exit(1);
    }
    for (int b = 0; b < NBUF; b++) recycle(b);
    for (int i = 0; i < NPORTS; i++) {
        ls[i] = listen_on(port + i);
        arm_accept(i);
    }
    for (;;) {
        io_uring_buf_ring_advance(br, nadd); /* buffers recycled last batch */
        nadd = 0;
        io_uring_submit_and_wait(&ring, 1);
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            complete(cqe);
            n++;
        }
        io_uring_cq_advance(&ring, n);
        if (nstarved && nfree >= NBUF / 4) { /* buffers again */
            int k = nstarved;
            nstarved = 0;
            for (int i = 0; i < k; i++) {
                struct conn *c = (struct conn *)(starved[i] & ~15UL);
                int d = starved[i] & 1;
                c->refs--;
                if (!c->dead) arm_recv(c, d);
                else if (c->refs == 0) {
                    ring_close(c->fd[0]);
                    ring_close(c->fd[1]);
                    free(c);
                }
            }
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    struct in_addr backend_ip;
    listen_ip.s_addr = backend_ip.s_addr = htonl(INADDR_LOOPBACK);
    if ((argc != 3 && argc != 5) ||
        (argc == 5 && (inet_pton(AF_INET, argv[3], &listen_ip) != 1 ||
                       inet_pton(AF_INET, argv[4], &backend_ip) != 1))) {
        fprintf(stderr, "usage: floor_uring PORT THREADS [LISTEN BACKEND]\n");
        return 2;
    }
    port = atoi(argv[1]);
    int threads = atoi(argv[2]);
    for (int i = 0; i < NPORTS; i++)
        backend[i] = (struct sockaddr_in){
            .sin_family = AF_INET, .sin_port = htons(BACKENDS[i]), .sin_addr = backend_ip};
    pthread_t t;
    for (int i = 1; i < threads; i++) pthread_create(&t, NULL, worker, NULL);
    worker(NULL);
}
