/* forkrun: a sandbox server's fork loop (see _server.py), in C.
 *
 * Why C: a fork of the warm server write-protects every page of both processes, so each
 * page either one writes afterwards costs a page fault (a copy while the other still maps
 * it). Per program the Python loop touched ~170 pages of the server and ~270 of the child;
 * fr_serve runs a stretch of a chunk's requests back to back, writing each answer frame
 * itself, so between two forks the server runs no Python at all (~15 faults).
 *
 * fr_run, one request (semantics of _server._run_child for one run without a trace):
 *   parent, before the fork: the program's work folder, stdin (a memory file, or
 *     /dev/null), stdout/stderr pipes;
 *   child: its own session, fds 0/1/2, every other fd closed, cwd = the work folder,
 *     the rlimits; then it returns 0 and Python runs the program;
 *   parent: reads both pipes (stdout: the first out_cap bytes kept; stderr: the last
 *     err_keep bytes kept) until the child exits, the wall clock runs out or too much
 *     output came; kills the child's process group; reaps it; reaps whatever else
 *     already exited; removes the work folder if it is empty.
 * fr_serve: fr_run for each request of a stretch, then the status (_server._finish) and
 *   the JSON answer frame; a request whose answer needs Python (see there) goes back to it.
 *
 * Called with the GIL held (ctypes.PyDLL; the server has no other thread), so a signal
 * that interrupts the wait runs the server's Python handlers at once through
 * check_signals (the parent-death handler exits). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define FR_EXIT_SETUP 214 /* _server.EXIT_SETUP */
#define FR_READ_CHUNK 65536

typedef struct {
    int resource;
    long soft, hard; /* -1: RLIM_INFINITY */
} fr_limit;

typedef struct {
    /* in */
    const char *workdir;
    const char *stdin_data;
    long stdin_len;
    const fr_limit *limits;
    int n_limits;
    int contained;   /* inside bwrap: no PDEATHSIG / SIGTERM reset needed */
    int server_pid;
    double timeout_s;
    long out_cap;    /* stdout: more than this is output_limit; this much is kept */
    long err_cap;    /* stderr: more than this is output_limit */
    long err_keep;   /* stderr: the last err_keep bytes are kept */
    char *out_buf;   /* out_cap bytes */
    char *err_buf;   /* 2 * err_keep + FR_READ_CHUNK bytes */
    int (*check_signals)(void); /* PyErr_CheckSignals: runs the server's signal handlers */
    double cpu_kill; /* a SIGKILL after this much CPU time is the CPU limit (a timeout) */
    int index;       /* fr_serve: the request its return value is about */
    /* out */
    long out_len, out_total, err_len, err_total;
    int pid;
    int running;     /* the child's pid while it runs, for the server's signal handler */
    int wstatus;
    int timed_out;
    int output_limit;
    int others_left; /* children (orphans adopted by us) still there after the reaping */
    int workdir_left; /* the work folder could not be removed (the program wrote files) */
    double cpu_s;     /* user + system time of the child */
    double duration_s;
} fr_job;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int write_all(int fd, const char *p, long n) {
    while (n > 0) {
        ssize_t w = write(fd, p, (size_t)n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= w;
    }
    return 0;
}

static int stdin_fd(const fr_job *job) {
    if (job->stdin_len <= 0) return open("/dev/null", O_RDONLY | O_CLOEXEC);
    int fd = (int)syscall(SYS_memfd_create, "stdin", MFD_CLOEXEC);
    if (fd < 0) return -1;
    if (write_all(fd, job->stdin_data, job->stdin_len) < 0 || lseek(fd, 0, SEEK_SET) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* In the child, after the fork: never returns on failure. */
static void child_setup(const fr_job *job, int in_fd, int out_w, int err_w) {
    setsid();
    if (!job->contained) {
        signal(SIGTERM, SIG_DFL); /* the server's handler is not the program's */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != job->server_pid) _exit(FR_EXIT_SETUP);
    }
    if (dup2(in_fd, 0) < 0 || dup2(out_w, 1) < 0 || dup2(err_w, 2) < 0) _exit(FR_EXIT_SETUP);
    if (syscall(SYS_close_range, 3U, ~0U, 0U) != 0) {
        for (int fd = 3; fd < 65536; fd++) close(fd); /* kernels before 5.9 */
    }
    if (chdir(job->workdir) != 0) _exit(FR_EXIT_SETUP);
    for (int i = 0; i < job->n_limits; i++) {
        struct rlimit rl;
        rl.rlim_cur = job->limits[i].soft < 0 ? RLIM_INFINITY : (rlim_t)job->limits[i].soft;
        rl.rlim_max = job->limits[i].hard < 0 ? RLIM_INFINITY : (rlim_t)job->limits[i].hard;
        setrlimit(job->limits[i].resource, &rl); /* as in Python: a refused limit is skipped */
    }
}

static void keep_out(fr_job *job, const char *p, long n) {
    long room = job->out_cap - job->out_len;
    if (room > 0) {
        long k = n < room ? n : room;
        memcpy(job->out_buf + job->out_len, p, (size_t)k);
        job->out_len += k;
    }
    job->out_total += n;
}

static void keep_err(fr_job *job, const char *p, long n) {
    if (job->err_len + n > 2 * job->err_keep + FR_READ_CHUNK) { /* keep only the tail */
        long keep = job->err_len < job->err_keep ? job->err_len : job->err_keep;
        memmove(job->err_buf, job->err_buf + job->err_len - keep, (size_t)keep);
        job->err_len = keep;
    }
    memcpy(job->err_buf + job->err_len, p, (size_t)n);
    job->err_len += n;
    job->err_total += n;
}

/* Read what fd has now into the job's stdout (which == 1) or stderr (2); 1 at EOF. */
static int drain(fr_job *job, int fd, int which) {
    static char chunk[FR_READ_CHUNK];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno != EAGAIN && errno != EWOULDBLOCK;
        }
        if (n == 0) return 1;
        if (which == 1) keep_out(job, chunk, n);
        else keep_err(job, chunk, n);
        if (job->out_total > job->out_cap || job->err_total > job->err_cap) job->output_limit = 1;
        if (n < (ssize_t)sizeof chunk) return 0;
    }
}

static int exited_nowait(int pid) {
    siginfo_t info;
    memset(&info, 0, sizeof info);
    if (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) != 0) return errno == ECHILD;
    return info.si_pid != 0;
}

/* Returns 0 in the child (ready to run the program), the child's pid in the parent once
 * everything is collected, or -errno when the child could not be started (or -EINTR: a
 * signal handler raised). */
static int fr_run(fr_job *job) {
    job->out_len = job->out_total = job->err_len = job->err_total = 0;
    job->pid = job->wstatus = job->timed_out = job->output_limit = 0;
    job->others_left = job->workdir_left = 0;
    job->cpu_s = job->duration_s = 0;
    int out_p[2] = {-1, -1}, err_p[2] = {-1, -1}, in_fd = -1, err = 0;
    if (mkdir(job->workdir, 0700) != 0) return -errno;
    if ((in_fd = stdin_fd(job)) < 0 || pipe2(out_p, O_CLOEXEC) != 0 || pipe2(err_p, O_CLOEXEC) != 0) {
        err = -errno;
        goto fail;
    }
    double t0 = now_s();
    pid_t pid = fork();
    if (pid < 0) {
        err = -errno;
        goto fail;
    }
    if (pid == 0) {
        child_setup(job, in_fd, out_p[1], err_p[1]);
        return 0;
    }
    job->pid = job->running = pid;
    close(in_fd);
    close(out_p[1]);
    close(err_p[1]);
    fcntl(out_p[0], F_SETFL, O_NONBLOCK);
    fcntl(err_p[0], F_SETFL, O_NONBLOCK);
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    struct pollfd fds[3] = {{out_p[0], POLLIN, 0}, {err_p[0], POLLIN, 0}, {pidfd, POLLIN, 0}};
    double deadline = t0 + job->timeout_s;
    int exited = 0, interrupted = 0;
    while (!exited && !job->output_limit) {
        double remaining = deadline - now_s();
        if (remaining <= 0) {
            job->timed_out = 1;
            break;
        }
        double wait_ms = pidfd >= 0 ? remaining * 1000 : (remaining * 1000 < 5 ? remaining * 1000 : 5);
        int ready = poll(fds, 3, (int)wait_ms + 1);
        if (ready < 0 && errno == EINTR && job->check_signals && job->check_signals() != 0) {
            interrupted = 1; /* a handler raised (KeyboardInterrupt): stop here, Python raises it */
            break;
        }
        if (ready < 0 && errno != EINTR) break;
        if (pidfd < 0 && exited_nowait(pid)) exited = 1; /* old kernel: no pidfd */
        if (ready <= 0) continue;
        if (fds[2].revents) exited = 1;
        for (int i = 0; i < 2; i++) {
            if (fds[i].revents && drain(job, fds[i].fd, i + 1)) fds[i].fd = -1; /* EOF: poll skips it */
        }
    }
    if (exited && !job->output_limit) { /* what the child wrote before exiting is still in the pipes */
        if (fds[0].fd >= 0) drain(job, fds[0].fd, 1);
        if (fds[1].fd >= 0) drain(job, fds[1].fd, 2);
    }
    /* The child's process group (the child, if still running, and what it forked without
     * setsid) while the child's pid is still reserved; then reap it. */
    kill(-pid, SIGKILL);
    struct rusage ru;
    int status = 0;
    while (wait4(pid, &status, 0, &ru) < 0 && errno == EINTR) {
    }
    job->running = 0;
    job->wstatus = status;
    job->duration_s = now_s() - t0;
    job->cpu_s = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
    for (;;) { /* orphans the program left that have exited already */
        pid_t other = waitpid(-1, NULL, WNOHANG);
        if (other > 0 || (other < 0 && errno == EINTR)) continue;
        job->others_left = other == 0;
        break;
    }
    if (pidfd >= 0) close(pidfd);
    close(out_p[0]);
    close(err_p[0]);
    if (rmdir(job->workdir) != 0) job->workdir_left = 1;
    return interrupted ? -EINTR : pid;
fail:
    if (in_fd >= 0) close(in_fd);
    for (int i = 0; i < 2; i++) {
        if (out_p[i] >= 0) close(out_p[i]);
        if (err_p[i] >= 0) close(err_p[i]);
    }
    rmdir(job->workdir);
    return err;
}

/* Buffers for the captures, allocated once per server (untouched pages cost a fork nothing). */
void *fr_alloc(long n) { return malloc((size_t)n); }

/* ------------------------------------------------------------------ the serve loop
 *
 * fr_serve runs a stretch of a chunk's requests (single runs without a trace) back to
 * back and writes each answer frame itself, so between two forks the server runs no
 * Python at all (every page Python writes after a fork is a page fault). It hands a
 * request back to Python when its answer needs Python: something left behind (orphans
 * still running, files in the work folder), a child that failed its set-up, or output
 * that is not valid UTF-8 (Python's decoder with "replace" makes that text). */

typedef struct {
    const char *stdin_data;
    long stdin_len;
} fr_req;

enum { FR_DONE = 0, FR_CHILD = 1, FR_PYTHON = 2, FR_GONE = 3 };

/* JSON string body of s[0:n] (valid UTF-8 copied, '"' '\' and controls escaped) into
 * out (when not NULL); its length, or -1 if s is not strictly valid UTF-8 (CPython's
 * decoder: no overlongs, surrogates or code points above U+10FFFF). */
static long json_text(const unsigned char *s, long n, char *out) {
    static const char hex[] = "0123456789abcdef";
    long len = 0;
    for (long i = 0; i < n;) {
        unsigned char c = s[i];
        if (c < 0x80) {
            const char *esc = NULL;
            char u[6];
            int k = 1;
            if (c == '"') esc = "\\\"";
            else if (c == '\\') esc = "\\\\";
            else if (c == '\n') esc = "\\n";
            else if (c == '\t') esc = "\\t";
            else if (c == '\r') esc = "\\r";
            else if (c < 0x20) {
                memcpy(u, "\\u00", 4);
                u[4] = hex[c >> 4];
                u[5] = hex[c & 15];
                k = 6;
            }
            if (esc) k = 2;
            if (out) {
                if (esc) memcpy(out + len, esc, 2);
                else if (k == 6) memcpy(out + len, u, 6);
                else out[len] = (char)c;
            }
            len += k;
            i++;
            continue;
        }
        int k;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) k = 2;
        else if (c >= 0xE0 && c <= 0xEF) {
            k = 3;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 4;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else return -1;
        if (i + k > n || s[i + 1] < lo || s[i + 1] > hi) return -1;
        for (int j = 2; j < k; j++)
            if (s[i + j] < 0x80 || s[i + j] > 0xBF) return -1;
        if (out) memcpy(out + len, s + i, (size_t)k);
        len += k;
        i += k;
    }
    return len;
}

/* _server._finish: the status and return code of a reaped child. */
static const char *status_of(const fr_job *job, int *rc, int *has_rc) {
    int st = job->wstatus;
    *has_rc = 1;
    if (WIFEXITED(st)) *rc = WEXITSTATUS(st);
    else if (WIFSIGNALED(st)) *rc = -WTERMSIG(st);
    else *has_rc = 0;
    if (job->timed_out) return "timeout";
    if (job->output_limit) return "output_limit";
    if (*has_rc && *rc == 0) return "ok";
    if (*has_rc && *rc == 213) return "memory"; /* _server.EXIT_MEMORY */
    if (*has_rc && *rc > 0) return "error";
    int sig = *has_rc ? -*rc : 0;
    if (sig == SIGXCPU || (sig == SIGKILL && job->cpu_s >= job->cpu_kill - 0.05)) return "timeout";
    return "killed";
}

/* One answer frame (4-byte big-endian length, then JSON, as _server._send): 0, 1 when the
 * output is not valid UTF-8 (Python answers), -1 when the trainer is gone. */
static int send_answer(const fr_job *job, int wfd) {
    const unsigned char *out = (const unsigned char *)job->out_buf;
    long err_from = job->err_len > job->err_keep ? job->err_len - job->err_keep : 0;
    const unsigned char *err = (const unsigned char *)job->err_buf + err_from;
    long err_n = job->err_len - err_from;
    long out_json = json_text(out, job->out_len, NULL), err_json = json_text(err, err_n, NULL);
    if (out_json < 0 || err_json < 0) return 1;
    int rc, has_rc;
    const char *status = status_of(job, &rc, &has_rc);
    char head[96], tail[160], rcs[16];
    if (has_rc) snprintf(rcs, sizeof rcs, "%d", rc);
    else strcpy(rcs, "null");
    int nh = snprintf(head, sizeof head, "{\"status\": \"%s\", \"stdout\": \"", status);
    int nt = snprintf(tail, sizeof tail,
                      "\", \"duration_s\": %.17g, \"returncode\": %s, \"anomaly\": null, \"trace\": null}",
                      job->duration_s, rcs);
    static const char mid[] = "\", \"stderr\": \"";
    long body = nh + out_json + (long)(sizeof mid - 1) + err_json + nt;
    char *frame = malloc((size_t)body + 4);
    if (!frame) return 1;
    frame[0] = (char)(body >> 24);
    frame[1] = (char)(body >> 16);
    frame[2] = (char)(body >> 8);
    frame[3] = (char)body;
    char *p = frame + 4;
    memcpy(p, head, (size_t)nh);
    p += nh;
    p += json_text(out, job->out_len, p);
    memcpy(p, mid, sizeof mid - 1);
    p += sizeof mid - 1;
    p += json_text(err, err_n, p);
    memcpy(p, tail, (size_t)nt);
    int r = write_all(wfd, frame, body + 4) == 0 ? 0 : -1;
    free(frame);
    return r;
}

/* Run reqs[start:n] and answer each on wfd. Returns FR_DONE (all answered), FR_CHILD (in
 * the child of request job->index: run its program), FR_PYTHON (request job->index ran,
 * its facts are in job; Python answers it, then calls again from job->index + 1),
 * FR_GONE (the trainer closed the pipe) or -errno (request job->index could not start). */
int fr_serve(fr_job *job, const fr_req *reqs, int start, int n, int wfd) {
    for (int i = start; i < n; i++) {
        job->index = i;
        job->stdin_data = reqs[i].stdin_data;
        job->stdin_len = reqs[i].stdin_len;
        int pid = fr_run(job);
        if (pid == 0) return FR_CHILD;
        if (pid < 0) return pid;
        int st = job->wstatus;
        if (job->others_left || job->workdir_left || (WIFEXITED(st) && WEXITSTATUS(st) == FR_EXIT_SETUP))
            return FR_PYTHON;
        int sent = send_answer(job, wfd);
        if (sent < 0) return FR_GONE;
        if (sent > 0) return FR_PYTHON;
    }
    return FR_DONE;
}
