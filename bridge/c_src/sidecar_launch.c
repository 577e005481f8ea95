/* sidecar_launch: what a bridge worker's Port runs when the pool has a template.
 *
 *   sidecar_launch SOCKET ARG...
 *
 * Connects to the pool's template (python -m sidecar.host.template_process, a process that
 * imported torch once), hands it this process's stdin, stdout and stderr (SCM_RIGHTS) with ARG...
 * (the `sidecar` command line, e.g. serve --stdio ...), the environment and the working directory,
 * and the template forks a worker that speaks the port protocol on exactly those pipes. Then it
 * waits for the worker's end and ends the same way (same exit code, or killed by the same signal),
 * so the Port's exit status is the worker's.
 *
 * SIGTERM (the pool giving up on a worker whose pid it does not know yet) is passed on as SIGKILL
 * to the worker. If the template goes away the worker dies with it (it is the worker's parent and
 * the worker has PDEATHSIG): we end as killed by SIGKILL. Exit 75 (EX_TEMPFAIL) means nothing was
 * started (no template to talk to, or it refused): the pool starts the worker cold instead.
 *
 * Protocol (sidecar/host/template.py): one JSON object per SOCK_SEQPACKET record.
 *   -> {"op": "spawn", "id": 1, "argv": [...], "env": {...}, "cwd": "..."} + fds [0, 1, 2]
 *   <- {"op": "spawned", "id": 1, "pid": N} + [pidfd]  |  {"op": "spawn_failed", "id": 1, "error": "..."}
 *   <- {"op": "exit", "pid": N, "status": WAIT_STATUS}
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define EXIT_NOT_STARTED 75
#define KILLED_BY_SIGKILL SIGKILL /* as a wait status: terminated by signal 9 */
#define MSG_MAX (1 << 20)

extern char **environ;

static volatile sig_atomic_t terminate_requested;

static void
on_term(int sig)
{
    (void)sig;
    terminate_requested = 1;
}

static void __attribute__((noreturn))
not_started(const char *what, const char *detail)
{
    fprintf(stderr, "sidecar_launch: %s%s%s; nothing was started\n", what, detail ? ": " : "", detail ? detail : "");
    exit(EXIT_NOT_STARTED);
}

/* -- a growable JSON text ------------------------------------------------------------------------ */

typedef struct {
    char *data;
    size_t len, cap;
} text_t;

static void
put(text_t *t, const char *s, size_t n)
{
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 4096;
        while (t->len + n + 1 > cap) {
            cap *= 2;
        }
        char *p = realloc(t->data, cap);
        if (p == NULL) {
            not_started("out of memory", NULL);
        }
        t->data = p;
        t->cap = cap;
    }
    memcpy(t->data + t->len, s, n);
    t->len += n;
    t->data[t->len] = '\0';
}

static void
puts_(text_t *t, const char *s)
{
    put(t, s, strlen(s));
}

/* A JSON string; bytes >= 0x80 pass through (UTF-8 in, UTF-8 out). */
static void
put_string(text_t *t, const char *s)
{
    put(t, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            put(t, esc, 2);
        }
        else if (c < 0x20) {
            char esc[8];
            snprintf(esc, sizeof(esc), "\\u%04x", c);
            puts_(t, esc);
        }
        else {
            put(t, (const char *)&c, 1);
        }
    }
    put(t, "\"", 1);
}

static void
build_request(text_t *t, int argc, char **argv)
{
    char cwd[4096];
    puts_(t, "{\"op\": \"spawn\", \"id\": 1, \"argv\": [");
    for (int i = 0; i < argc; i++) {
        if (i) {
            puts_(t, ", ");
        }
        put_string(t, argv[i]);
    }
    puts_(t, "], \"env\": {");
    int first = 1;
    for (char **e = environ; *e; e++) {
        char *eq = strchr(*e, '=');
        if (eq == NULL) {
            continue;
        }
        *eq = '\0';
        if (!first) {
            puts_(t, ", ");
        }
        first = 0;
        put_string(t, *e);
        puts_(t, ": ");
        put_string(t, eq + 1);
        *eq = '=';
    }
    puts_(t, "}, \"cwd\": ");
    if (getcwd(cwd, sizeof(cwd)) != NULL) {
        put_string(t, cwd);
    }
    else {
        puts_(t, "null");
    }
    puts_(t, "}");
}

/* -- reading the template's replies (flat JSON objects written by json.dumps) -------------------- */

/* The text after `"key":` (spaces skipped), or NULL. */
static const char *
field(const char *msg, const char *key)
{
    char quoted[32];
    snprintf(quoted, sizeof(quoted), "\"%s\"", key);
    const char *p = strstr(msg, quoted);
    if (p == NULL) {
        return NULL;
    }
    p += strlen(quoted);
    while (*p == ' ') {
        p++;
    }
    if (*p != ':') {
        return NULL;
    }
    p++;
    while (*p == ' ') {
        p++;
    }
    return p;
}

static int
field_is(const char *msg, const char *key, const char *value)
{
    const char *p = field(msg, key);
    size_t n = strlen(value);
    return p != NULL && *p == '"' && strncmp(p + 1, value, n) == 0 && p[n + 1] == '"';
}

static int
field_int(const char *msg, const char *key, long *out)
{
    const char *p = field(msg, key);
    if (p == NULL) {
        return 0;
    }
    char *end;
    errno = 0;
    long v = strtol(p, &end, 10);
    if (end == p || errno != 0) {
        return 0;
    }
    *out = v;
    return 1;
}

/* One record; received descriptors are closed (we need none). 0 on EOF, -1 on error. */
static ssize_t
recv_record(int sock, char *buf, size_t cap)
{
    char control[CMSG_SPACE(sizeof(int) * 8)];
    struct iovec iov = {buf, cap - 1};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control;
    mh.msg_controllen = sizeof(control);
    ssize_t n;
    do {
        n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR && !terminate_requested);
    if (n < 0) {
        return -1;
    }
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int *fds = (int *)CMSG_DATA(c);
            size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < count; i++) {
                (void)close(fds[i]);
            }
        }
    }
    buf[n] = '\0';
    return n;
}

/* Blocks until a record arrives, passing a SIGTERM on to the worker meanwhile. */
static ssize_t
wait_record(int sock, char *buf, size_t cap, long worker)
{
    for (;;) {
        if (terminate_requested && worker > 0) {
            (void)kill((pid_t)worker, SIGKILL);
            terminate_requested = 0;
        }
        struct pollfd pfd = {sock, POLLIN, 0};
        int rc = poll(&pfd, 1, -1);
        if (rc < 0 && errno == EINTR) {
            continue;
        }
        if (rc < 0) {
            return -1;
        }
        ssize_t n = recv_record(sock, buf, cap);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        return n;
    }
}

static void __attribute__((noreturn))
end_like(int status)
{
    if (WIFEXITED(status)) {
        exit(WEXITSTATUS(status));
    }
    int sig = WIFSIGNALED(status) ? WTERMSIG(status) : SIGKILL;
    struct rlimit no_core = {0, 0};
    (void)setrlimit(RLIMIT_CORE, &no_core); /* the worker's crash, not ours: no second core file */
    signal(sig, SIG_DFL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    (void)sigprocmask(SIG_UNBLOCK, &set, NULL);
    (void)raise(sig);
    _exit(128 + sig);
}

int
main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: sidecar_launch SOCKET ARG...\n");
        return EXIT_NOT_STARTED;
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_term;
    sigemptyset(&sa.sa_mask);
    (void)sigaction(SIGTERM, &sa, NULL);

    struct sockaddr_un addr = {0};
    addr.sun_family = AF_UNIX;
    if (strlen(argv[1]) >= sizeof(addr.sun_path)) {
        not_started("socket path too long", argv[1]);
    }
    strcpy(addr.sun_path, argv[1]);
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (sock < 0) {
        not_started("socket", strerror(errno));
    }
    int rc;
    do {
        rc = connect(sock, (struct sockaddr *)&addr, sizeof(addr));
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        not_started("cannot reach the template", strerror(errno));
    }

    text_t req = {0};
    build_request(&req, argc - 2, argv + 2);
    if (req.len > MSG_MAX) {
        not_started("spawn request too large", NULL);
    }
    int fds[3] = {0, 1, 2};
    char control[CMSG_SPACE(sizeof(fds))];
    memset(control, 0, sizeof(control));
    struct iovec iov = {req.data, req.len};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control;
    mh.msg_controllen = sizeof(control);
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(fds));
    memcpy(CMSG_DATA(c), fds, sizeof(fds));
    ssize_t sent;
    do {
        sent = sendmsg(sock, &mh, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent != (ssize_t)req.len) {
        not_started("cannot send to the template", sent < 0 ? strerror(errno) : "short send");
    }
    free(req.data);

    char *buf = malloc(MSG_MAX);
    if (buf == NULL) {
        not_started("out of memory", NULL);
    }
    ssize_t n = wait_record(sock, buf, MSG_MAX, 0);
    long worker = 0;
    if (n <= 0) {
        not_started("the template closed the connection", NULL);
    }
    if (field_is(buf, "op", "spawn_failed")) {
        not_started("the template could not fork", buf);
    }
    if (!field_is(buf, "op", "spawned") || !field_int(buf, "pid", &worker) || worker <= 0) {
        not_started("unexpected reply from the template", buf);
    }
    /* The pool learns a worker's pid from its ready term; one that dies before that is named by
     * this line in its log (Sidecar.Worker reads it back). */
    fprintf(stderr, "sidecar_launch: worker pid %ld forked by the template\n", worker);
    fflush(stderr);
    /* The worker has the pipes now; we keep none of them open (stderr stays for our messages). */
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull >= 0) {
        (void)dup2(devnull, 0);
        (void)dup2(devnull, 1);
        (void)close(devnull);
    }
    for (;;) {
        n = wait_record(sock, buf, MSG_MAX, worker);
        if (n <= 0) {
            /* The template is gone, and its workers with it (PDEATHSIG SIGKILL). */
            end_like(KILLED_BY_SIGKILL);
        }
        long pid, status;
        if (field_is(buf, "op", "exit") && field_int(buf, "pid", &pid) && pid == worker &&
            field_int(buf, "status", &status)) {
            end_like((int)status);
        }
    }
}
