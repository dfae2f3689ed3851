/* The flash reader's reads: a pool of threads that takes a batch of positional reads (runs of
   bundle records) at once, each thread taking the next run as it finishes one, and checks each
   record it read against its checksum while the record is still in the thread's cache.

   Why by hand: each read is one pread(2) call; from Python every call also takes the
   interpreter's lock, and on 2 cores that lock, not the disk, capped the engine's reads at about
   50,000 a second of 3.5 KiB (README, "Decisions"), and a Python thread pool woke each of its
   threads for every layer's batch. ctypes releases the lock for the whole call. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

uint64_t xxh3_long(const uint8_t *in, int64_t len); /* sums.c */

typedef struct {
    /* the batch */
    int fd, buffered;
    int64_t n, size;
    const int64_t *offsets, *lengths, *dests;
    /* the checks: record r of run i (stride bytes apart, record_bytes hashed) must hash to
       want[first[i] + r]; want NULL: no checks */
    int64_t stride, record_bytes;
    const uint64_t *want;
    const int64_t *first;
    /* progress and outcome */
    int64_t next, total, failed_run, failed_record, check_ns;
    int error; /* errno of the failed run; 0: the file ended early; -1: a checksum */
} batch_t;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t go, idle;
    pthread_t *threads;
    int nthreads, running, quit;
    uint64_t generation;
    batch_t *batch;
} pool_t;

static void fail(batch_t *b, int64_t run, int64_t record, int error) {
    /* the first failing run in order wins, whichever thread finds it */
    int64_t old = __atomic_load_n(&b->failed_run, __ATOMIC_SEQ_CST);
    while (run < old) {
        if (__atomic_compare_exchange_n(&b->failed_run, &old, run, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
            b->failed_record = record; /* read once every thread is done */
            b->error = error;
            break;
        }
    }
}

static void work(batch_t *b) {
    int64_t total = 0;
    for (;;) {
        int64_t i = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED);
        if (i >= b->n || __atomic_load_n(&b->failed_run, __ATOMIC_RELAXED) < i) break;
        int64_t done = 0, len = b->lengths[i];
        char *dst = (char *)(intptr_t)b->dests[i];
        int bad = 0;
        while (done < len) {
            ssize_t r = pread(b->fd, dst + done, (size_t)(len - done), b->offsets[i] + done);
            if (r < 0) {
                if (errno == EINTR) continue;
                fail(b, i, -1, errno);
                bad = 1;
                break;
            }
            if (r == 0) {
                if (b->offsets[i] + done >= b->size) break; /* the rest stays as it was */
                fail(b, i, -1, 0);
                bad = 1;
                break;
            }
            done += r;
        }
        if (bad) continue;
        if (b->buffered) posix_fadvise(b->fd, b->offsets[i], len, POSIX_FADV_DONTNEED);
        total += done;
        if (b->want) {
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            for (int64_t r = 0; r * b->stride < len; r++) {
                const uint8_t *rec = (const uint8_t *)dst + r * b->stride;
                if (xxh3_long(rec, b->record_bytes) != b->want[b->first[i] + r]) {
                    fail(b, i, r, -1);
                    break;
                }
            }
            clock_gettime(CLOCK_MONOTONIC, &t1);
            int64_t ns = (t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
            __atomic_fetch_add(&b->check_ns, ns, __ATOMIC_RELAXED);
        }
    }
    __atomic_fetch_add(&b->total, total, __ATOMIC_RELAXED);
}

static void *worker(void *arg) {
    pool_t *p = arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->quit && p->generation == seen) pthread_cond_wait(&p->go, &p->mu);
        if (p->quit) break;
        seen = p->generation;
        batch_t *b = p->batch;
        pthread_mutex_unlock(&p->mu);
        work(b);
        pthread_mutex_lock(&p->mu);
        if (--p->running == 0) pthread_cond_signal(&p->idle);
    }
    pthread_mutex_unlock(&p->mu);
    return 0;
}

/* A pool of `threads` reading threads (the caller of pool_read reads too). NULL on failure. */
void *pool_new(int threads) {
    pool_t *p = calloc(1, sizeof(pool_t));
    if (!p) return 0;
    pthread_mutex_init(&p->mu, 0);
    pthread_cond_init(&p->go, 0);
    pthread_cond_init(&p->idle, 0);
    p->threads = calloc(threads > 1 ? threads - 1 : 1, sizeof(pthread_t));
    for (int t = 0; t + 1 < threads; t++) {
        if (pthread_create(&p->threads[t], 0, worker, p)) break;
        p->nthreads++;
    }
    return p;
}

void pool_free(void *pool) {
    pool_t *p = pool;
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->quit = 1;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (int t = 0; t < p->nthreads; t++) pthread_join(p->threads[t], 0);
    free(p->threads);
    free(p);
}

/* Read run i: lengths[i] bytes at file offset offsets[i] into the address dests[i], for i < n,
   with the pool's threads, and (want not NULL) check each record read. A read that reaches
   the end of the file (size) stops there, the rest of its destination as it was (an aligned
   read may run past the end). buffered: drop what was read from the page cache
   (POSIX_FADV_DONTNEED). Returns the bytes read, or -(i + 1) for the first run that failed:
   *error its errno (0: the file ended before `size`; -1: record *record's checksum).
   *check_ns: the threads' time spent checking, added up. One batch at a time per pool. */
int64_t pool_read(void *pool, int fd, int64_t n, const int64_t *offsets, const int64_t *lengths,
                  const int64_t *dests, int64_t size, int buffered, int64_t stride,
                  int64_t record_bytes, const uint64_t *want, const int64_t *first, int *error,
                  int64_t *record, int64_t *check_ns) {
    pool_t *p = pool;
    batch_t b = {fd, buffered, n, size, offsets, lengths, dests, stride, record_bytes, want, first,
                 0, 0, INT64_MAX, -1, 0, 0};
    int helpers = p->nthreads < n - 1 ? p->nthreads : (int)(n - 1);
    if (helpers > 0) {
        pthread_mutex_lock(&p->mu);
        p->batch = &b;
        p->running = p->nthreads;
        p->generation++;
        pthread_cond_broadcast(&p->go);
        pthread_mutex_unlock(&p->mu);
    }
    work(&b);
    if (helpers > 0) {
        pthread_mutex_lock(&p->mu);
        while (p->running > 0) pthread_cond_wait(&p->idle, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
    *check_ns = b.check_ns;
    if (b.failed_run != INT64_MAX) {
        *error = b.error;
        *record = b.failed_record;
        return -(b.failed_run + 1);
    }
    return b.total;
}

/* One thread's loop over runs, no pool and no checks (the disk probe's jobs, each a thread of
   its own as fio's are): returns the bytes read, or -(i + 1) with *error as pool_read's. */
int64_t read_runs(int fd, int64_t n, const int64_t *offsets, const int64_t *lengths,
                  const int64_t *dests, int64_t size, int buffered, int *error) {
    batch_t b = {fd, buffered, n, size, offsets, lengths, dests, 0, 0, 0, 0, 0, 0, INT64_MAX, -1,
                 0, 0};
    work(&b);
    if (b.failed_run != INT64_MAX) {
        *error = b.error;
        return -(b.failed_run + 1);
    }
    return b.total;
}
