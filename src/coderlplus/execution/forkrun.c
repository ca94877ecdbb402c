/* forkrun: the per-program work of a sandbox server (see _server.py), in C.
 *
 * Why C: a fork of the warm server write-protects every page of both processes, so each
 * page either one writes afterwards costs a page fault (a copy while the other still
 * maps it). The Python version of this code touched ~160 pages of the server and ~70 of
 * the child per program; here the server touches its C stack and the output buffers, the
 * child its stack. Semantics are those of _server._run_child for one run without a trace:
 *
 *   parent, before the fork: the program's work folder, stdin (a memory file, or
 *     /dev/null), stdout/stderr pipes;
 *   child: its own session, fds 0/1/2, every other fd closed, cwd = the work folder,
 *     the rlimits; then fr_run returns 0 and Python runs the program;
 *   parent: reads both pipes (stdout: the first out_cap bytes kept; stderr: the last
 *     err_keep bytes kept) until the child exits, the wall clock runs out or too much
 *     output came; kills the child's process group; reaps it; reaps whatever else
 *     already exited; removes the work folder if it is empty.
 *
 * Everything else (statuses, orphans still alive, a folder with files) is decided by
 * the Python caller from the fields filled in here. Called with the GIL held (ctypes.PyDLL;
 * the server has no other thread), so a signal that interrupts the wait runs the server's
 * Python handlers at once through check_signals (the parent-death handler exits). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
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
 * everything is collected, or -errno when the child could not be started. */
int fr_run(fr_job *job) {
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
