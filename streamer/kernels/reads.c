/* The flash reader's inner loop: a thread's share of a batch of positional reads.

   Why by hand: each read is one pread(2) call; from Python every call also takes the
   interpreter's lock, and on 2 cores that lock, not the disk, capped the engine's reads at about
   50,000 a second of 3.5 KiB (README, "Decisions"). The reader's threads each call this once for
   their stripe of a batch; ctypes releases the lock for the whole call. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <unistd.h>

/* Read run i: lengths[i] bytes at file offset offsets[i] into the address dests[i], for i < n.
   A read that reaches the end of the file (size) stops there, the rest of its destination as
   it was (an aligned read may run past the end). buffered: drop what was read from the page
   cache after each read (POSIX_FADV_DONTNEED). Returns the bytes read, or -(i + 1) for the
   first run that failed, its errno in *error (0: the file ended before `size`). */
int64_t read_runs(int fd, int64_t n, const int64_t *offsets, const int64_t *lengths,
                  const int64_t *dests, int64_t size, int buffered, int *error) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t done = 0, len = lengths[i];
        char *dst = (char *)(intptr_t)dests[i];
        while (done < len) {
            ssize_t r = pread(fd, dst + done, (size_t)(len - done), offsets[i] + done);
            if (r < 0) {
                if (errno == EINTR) continue;
                *error = errno;
                return -(i + 1);
            }
            if (r == 0) {
                if (offsets[i] + done >= size) break;
                *error = 0;
                return -(i + 1);
            }
            done += r;
        }
        if (buffered) posix_fadvise(fd, offsets[i], len, POSIX_FADV_DONTNEED);
        total += done;
    }
    return total;
}
