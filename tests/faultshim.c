/* An LD_PRELOAD disk-fault injector for edgemoe's tests (tests/test_faults.py builds and uses it).

   It wraps pread, pread64, preadv, preadv64, preadv2 and preadv64v2 (CPython's os.preadv calls the last).
   Reads of one file -- EDGEMOE_FAULT_FILE, matched by st_dev/st_ino -- follow the rules in a control file,
   EDGEMOE_FAULT_CTL, read again on every such read, so a test starts and stops faults while a server runs:

       eio   LO HI COUNT [USEC]  the next COUNT reads overlapping bytes [LO, HI) fail with EIO (-1: all);
                                 with USEC, only for USEC microseconds from the first such failure
       short LO HI COUNT [USEC]  ... return half of the bytes they read
       delay LO HI COUNT USEC    ... sleep USEC microseconds first

   Rewriting the file (any change of its text) resets the counts and windows. Each injected fault is appended to
   EDGEMOE_FAULT_LOG as "eio|short|delay OFFSET LENGTH"; with EDGEMOE_FAULT_TRACE=1 every read of the
   file is logged too, as "read OFFSET LENGTH".

   Build: cc -shared -fPIC -O2 -o faultshim.so faultshim.c -ldl
*/
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_RULES 32

struct rule {
    char kind[8];
    long long lo, hi;
    long count; /* injections left; -1 = unlimited */
    long usec;  /* delay: the sleep; eio, short: the window (0 = none) */
    long long first_us; /* eio, short: when the first fault was injected (0 = not yet) */
};

static struct rule rules[MAX_RULES];
static int n_rules;
static char parsed_from[4096]; /* the control file's text the rules came from */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static long long now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static int is_target(int fd) {
    const char *path = getenv("EDGEMOE_FAULT_FILE");
    struct stat a, b;
    if (path == NULL || fstat(fd, &a) != 0 || stat(path, &b) != 0) return 0;
    return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/* Re-read the control file; a changed text replaces the rules (and their counts). Holds `lock`. */
static void load_rules(void) {
    const char *ctl = getenv("EDGEMOE_FAULT_CTL");
    char text[sizeof parsed_from];
    ssize_t n = 0;
    int fd = ctl ? open(ctl, O_RDONLY | O_CLOEXEC) : -1;
    if (fd >= 0) {
        n = read(fd, text, sizeof text - 1);
        close(fd);
    }
    text[n > 0 ? n : 0] = '\0';
    if (strcmp(text, parsed_from) == 0) return;
    strcpy(parsed_from, text);
    n_rules = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line != NULL && n_rules < MAX_RULES;
         line = strtok_r(NULL, "\n", &save)) {
        struct rule r = {0};
        if (sscanf(line, "%7s %lld %lld %ld %ld", r.kind, &r.lo, &r.hi, &r.count, &r.usec) >= 4) rules[n_rules++] = r;
    }
}

static void log_event(const char *what, long long offset, size_t length) {
    const char *path = getenv("EDGEMOE_FAULT_LOG");
    if (path == NULL) return;
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    char line[96];
    int n = snprintf(line, sizeof line, "%s %lld %zu\n", what, offset, length);
    if (write(fd, line, (size_t)n) < 0) { /* best effort */ }
    close(fd);
}

/* Before a read of `length` bytes at `offset`: 1 = fail it with EIO, else 0 (*halve: shorten its result). */
static int before(int fd, long long offset, size_t length, int *halve) {
    *halve = 0;
    if (!is_target(fd)) return 0;
    long usec = 0;
    int eio = 0;
    pthread_mutex_lock(&lock);
    load_rules();
    const char *trace = getenv("EDGEMOE_FAULT_TRACE");
    if (trace != NULL && trace[0] == '1') log_event("read", offset, length);
    for (int i = 0; i < n_rules; i++) {
        struct rule *r = &rules[i];
        if (r->count == 0 || offset >= r->hi || offset + (long long)length <= r->lo) continue;
        int windowed = r->usec > 0 && strcmp(r->kind, "delay") != 0;
        if (windowed && r->first_us == 0) r->first_us = now_us();
        if (windowed && now_us() - r->first_us > r->usec) {
            r->count = 0; /* the window has passed */
            continue;
        }
        if (r->count > 0) r->count--;
        log_event(r->kind, offset, length);
        if (strcmp(r->kind, "eio") == 0) eio = 1;
        else if (strcmp(r->kind, "short") == 0) *halve = 1;
        else if (strcmp(r->kind, "delay") == 0) usec += r->usec;
    }
    pthread_mutex_unlock(&lock);
    if (usec > 0) usleep((useconds_t)usec);
    return eio;
}

static ssize_t after(ssize_t got, int halve) {
    return halve && got > 1 ? got / 2 : got;
}

static size_t iov_bytes(const struct iovec *iov, int iovcnt) {
    size_t n = 0;
    for (int i = 0; i < iovcnt; i++) n += iov[i].iov_len;
    return n;
}

#define REAL(name) static __typeof__(name) *real; if (real == NULL) real = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)
#define INJECT(offset, length, call)                 \
    int halve;                                       \
    if (before(fd, (long long)(offset), (length), &halve)) { \
        errno = EIO;                                 \
        return -1;                                   \
    }                                                \
    return after(call, halve)

ssize_t pread(int fd, void *buf, size_t count, off_t offset) {
    REAL(pread);
    INJECT(offset, count, real(fd, buf, count, offset));
}

ssize_t pread64(int fd, void *buf, size_t count, off64_t offset) {
    REAL(pread64);
    INJECT(offset, count, real(fd, buf, count, offset));
}

ssize_t preadv(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    REAL(preadv);
    INJECT(offset, iov_bytes(iov, iovcnt), real(fd, iov, iovcnt, offset));
}

ssize_t preadv64(int fd, const struct iovec *iov, int iovcnt, off64_t offset) {
    REAL(preadv64);
    INJECT(offset, iov_bytes(iov, iovcnt), real(fd, iov, iovcnt, offset));
}

ssize_t preadv2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags) {
    REAL(preadv2);
    INJECT(offset, iov_bytes(iov, iovcnt), real(fd, iov, iovcnt, offset, flags));
}

ssize_t preadv64v2(int fd, const struct iovec *iov, int iovcnt, off64_t offset, int flags) {
    REAL(preadv64v2);
    INJECT(offset, iov_bytes(iov, iovcnt), real(fd, iov, iovcnt, offset, flags));
}
