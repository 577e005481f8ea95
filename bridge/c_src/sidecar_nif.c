/* Sidecar.Native: POSIX shared-memory segments mapped into the BEAM, handed out as binaries.
 *
 * One job: create/open/map segments and expose their bytes to Erlang terms without a copy
 * (enif_make_resource_binary). No policy lives here: segment names, ownership and unlinking are
 * decided in Elixir (Sidecar.Shm), as sidecar._native leaves them to sidecar.dataplane.
 *
 * Resources:
 *   segment  one mapping (addr, size, inode, writable). Unmapped only by its destructor, i.e.
 *            once no term, no binary and no lease refers to it: a binary can never outlive the
 *            memory it shows.
 *   lease    what the binaries of one worker result hold: it keeps their segments mapped and,
 *            when the last of those binaries is garbage-collected, its destructor sends a message
 *            (given by Elixir) to a process (the worker that owns the lease, which hands it back).
 *
 * Every argument is checked; bad input is {error, {badarg, What}}, a failed syscall is
 * {error, {Errno, Syscall}} (Errno an atom such as enospc), never a crash. Syscalls are retried on
 * EINTR. create/2 (fallocate and pre-faulting touch every page) runs on a dirty I/O scheduler,
 * write_dirty/3 (memcpy of large data) on a dirty CPU scheduler.
 */
#include <erl_nif.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Far above any tensor we move, far below what overflows size_t/off_t arithmetic. */
#define MAX_SEGMENT_BYTES (1ULL << 46)

typedef struct segment {
    char *addr;             /* base of the mapping; NULL for an empty segment */
    size_t size;
    unsigned long long inode;
    int writable;
    char name[NAME_MAX + 2];
    struct segment *next;   /* the registry of live mappings (locate/1) */
    struct segment *prev;
} segment_t;

typedef struct {
    ErlNifPid owner;
    ErlNifEnv *msg_env;     /* holds the message term until the destructor sends it */
    ERL_NIF_TERM msg;
    unsigned count;
    segment_t **segments;   /* one kept reference per view (duplicates allowed) */
} lease_t;

static ErlNifResourceType *SEGMENT_TYPE;
static ErlNifResourceType *LEASE_TYPE;

/* Live mappings, so locate/1 can tell whether a binary's bytes lie in one of them. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static segment_t *registry_head;

static ERL_NIF_TERM ATOM_OK, ATOM_ERROR, ATOM_BADARG, ATOM_TRUE, ATOM_FALSE, ATOM_NOT_FOUND;

static char EMPTY_BYTES[1];

/* -- terms --------------------------------------------------------------------------------------- */

static ERL_NIF_TERM
error_pair(ErlNifEnv *env, ERL_NIF_TERM tag, const char *what)
{
    return enif_make_tuple2(env, ATOM_ERROR, enif_make_tuple2(env, tag, enif_make_atom(env, what)));
}

static ERL_NIF_TERM
badarg(ErlNifEnv *env, const char *what)
{
    return error_pair(env, ATOM_BADARG, what);
}

static const char *
errno_name(int err)
{
    switch (err) {
    case EACCES: return "eacces";
    case EBADF: return "ebadf";
    case EDQUOT: return "edquot";
    case EEXIST: return "eexist";
    case EFBIG: return "efbig";
    case EINVAL: return "einval";
    case EIO: return "eio";
    case EISDIR: return "eisdir";
    case ELOOP: return "eloop";
    case EMFILE: return "emfile";
    case ENAMETOOLONG: return "enametoolong";
    case ENFILE: return "enfile";
    case ENODEV: return "enodev";
    case ENOENT: return "enoent";
    case ENOMEM: return "enomem";
    case ENOSPC: return "enospc";
    case ENOTSUP: return "enotsup";
    case EOVERFLOW: return "eoverflow";
    case EPERM: return "eperm";
    case ETXTBSY: return "etxtbsy";
    default: return "eunknown";
    }
}

static ERL_NIF_TERM
syscall_error(ErlNifEnv *env, int err, const char *syscall)
{
    return error_pair(env, enif_make_atom(env, errno_name(err)), syscall);
}

/* A segment name in POSIX's portable form: a binary of 2..NAME_MAX+1 bytes, "/" then no other "/"
 * and no NUL, copied into `out`. (glibc would also take "x" for "/x"; we do not guess.) Which names
 * are acceptable beyond that is Sidecar.Shm's business. */
static int
get_name(ErlNifEnv *env, ERL_NIF_TERM term, char out[NAME_MAX + 2])
{
    ErlNifBinary bin;
    if (!enif_inspect_binary(env, term, &bin) || bin.size < 2 || bin.size > NAME_MAX + 1 || bin.data[0] != '/') {
        return 0;
    }
    if (memchr(bin.data, '\0', bin.size) != NULL || memchr(bin.data + 1, '/', bin.size - 1) != NULL) {
        return 0;
    }
    memcpy(out, bin.data, bin.size);
    out[bin.size] = '\0';
    return 1;
}

static int
get_size(ErlNifEnv *env, ERL_NIF_TERM term, size_t *out)
{
    ErlNifUInt64 v;
    if (!enif_get_uint64(env, term, &v) || v > MAX_SEGMENT_BYTES) {
        return 0;
    }
    *out = (size_t)v;
    return 1;
}

static int
get_bool(ErlNifEnv *env, ERL_NIF_TERM term, int *out)
{
    (void)env;
    if (enif_is_identical(term, ATOM_TRUE)) {
        *out = 1;
        return 1;
    }
    if (enif_is_identical(term, ATOM_FALSE)) {
        *out = 0;
        return 1;
    }
    return 0;
}

/* offset + nbytes within size, without overflow. */
static int
in_bounds(size_t size, size_t offset, size_t nbytes)
{
    return offset <= size && nbytes <= size - offset;
}

/* -- syscalls ------------------------------------------------------------------------------------ */

/* Evaluates `call` (-1 and errno on failure) again for as long as a signal interrupts it. */
#define RETRY_EINTR(result, call) \
    do {                          \
        (result) = (call);        \
    } while ((result) < 0 && errno == EINTR)

/* close(2) keeping errno (the error being reported); never retried: on Linux the descriptor is
 * released even when close is interrupted. */
static void
release_fd(int fd)
{
    int saved = errno;
    (void)close(fd);
    errno = saved;
}

/* posix_fallocate returns the error instead of setting errno. */
static int
fallocate_retry(int fd, off_t size)
{
    int rc;
    do {
        rc = posix_fallocate(fd, 0, size);
    } while (rc == EINTR);
    if (rc == EOPNOTSUPP || rc == ENOTSUP) {
        return 0; /* a filesystem without fallocate (tmpfs has it): keep the sized file */
    }
    if (rc != 0) {
        errno = rc;
        return -1;
    }
    return 0;
}

/* -- segment resource ---------------------------------------------------------------------------- */

static void
registry_add(segment_t *seg)
{
    pthread_mutex_lock(&registry_lock);
    seg->prev = NULL;
    seg->next = registry_head;
    if (registry_head != NULL) {
        registry_head->prev = seg;
    }
    registry_head = seg;
    pthread_mutex_unlock(&registry_lock);
}

static void
registry_remove(segment_t *seg)
{
    pthread_mutex_lock(&registry_lock);
    if (seg->prev != NULL) {
        seg->prev->next = seg->next;
    }
    else if (registry_head == seg) {
        registry_head = seg->next;
    }
    if (seg->next != NULL) {
        seg->next->prev = seg->prev;
    }
    seg->next = seg->prev = NULL;
    pthread_mutex_unlock(&registry_lock);
}

static void
segment_dtor(ErlNifEnv *env, void *obj)
{
    (void)env;
    segment_t *seg = obj;
    if (seg->addr != NULL) {
        registry_remove(seg);
        (void)munmap(seg->addr, seg->size);
        seg->addr = NULL;
    }
}

/* Wraps a fresh mapping in a resource; the term owns it. On allocation failure the mapping goes. */
static ERL_NIF_TERM
make_segment(ErlNifEnv *env, const char *name, char *addr, size_t size, unsigned long long inode,
             int writable, ERL_NIF_TERM *out)
{
    segment_t *seg = enif_alloc_resource(SEGMENT_TYPE, sizeof(segment_t));
    if (seg == NULL) {
        if (addr != NULL) {
            (void)munmap(addr, size);
        }
        return syscall_error(env, ENOMEM, "enif_alloc_resource");
    }
    memset(seg, 0, sizeof(*seg));
    seg->addr = addr;
    seg->size = size;
    seg->inode = inode;
    seg->writable = writable;
    strncpy(seg->name, name, sizeof(seg->name) - 1);
    if (addr != NULL) {
        registry_add(seg);
    }
    *out = enif_make_resource(env, seg);
    enif_release_resource(seg); /* the term holds the only reference now */
    return ATOM_OK;
}

/* create(Name, Nbytes) -> {ok, Segment, Inode} | {error, Reason}
 * shm_open(O_CREAT|O_EXCL, 0600): the mode is right from the first instant, never chmodded later;
 * the space is reserved (posix_fallocate) so a full /dev/shm is an error here, never a SIGBUS when
 * a page is touched; the mapping is read-write and pre-faulted. A half-made segment is unlinked. */
static ERL_NIF_TERM
nif_create(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
    char name[NAME_MAX + 2];
    size_t size;
    (void)argc;
    if (!get_name(env, argv[0], name)) {
        return badarg(env, "name");
    }
    if (!get_size(env, argv[1], &size)) {
        return badarg(env, "nbytes");
    }
    int fd;
    RETRY_EINTR(fd, shm_open(name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600));
    if (fd < 0) {
        return syscall_error(env, errno, "shm_open");
    }
    const char *failed = NULL;
    struct stat st;
    char *addr = NULL;
    int truncated;
    RETRY_EINTR(truncated, ftruncate(fd, (off_t)size));
    if (truncated < 0) {
        failed = "ftruncate";
    }
    else if (size > 0 && fallocate_retry(fd, (off_t)size) < 0) {
        failed = "posix_fallocate";
    }
    else if (fstat(fd, &st) < 0) {
        failed = "fstat";
    }
    else if (size > 0) {
        void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
        if (p == MAP_FAILED) {
            failed = "mmap";
        }
        else {
            addr = p;
        }
    }
    if (failed != NULL) {
        int err = errno;
        release_fd(fd);
        (void)shm_unlink(name);
        return syscall_error(env, err, failed);
    }
    release_fd(fd); /* the mapping keeps the segment; no descriptor stays open */
    ERL_NIF_TERM seg;
    ERL_NIF_TERM rc = make_segment(env, name, addr, size, (unsigned long long)st.st_ino, 1, &seg);
    if (rc != ATOM_OK) {
        (void)shm_unlink(name);
        return rc;
    }
    return enif_make_tuple3(env, ATOM_OK, seg, enif_make_uint64(env, (ErlNifUInt64)st.st_ino));
}

/* open(Name, Writable) -> {ok, Segment, Size, Inode} | {error, Reason}
 * Maps an existing segment whole (its size from fstat), read-only unless asked. */
static ERL_NIF_TERM
nif_open(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
    char name[NAME_MAX + 2];
    int writable;
    (void)argc;
    if (!get_name(env, argv[0], name)) {
        return badarg(env, "name");
    }
    if (!get_bool(env, argv[1], &writable)) {
        return badarg(env, "writable");
    }
    int fd;
    RETRY_EINTR(fd, shm_open(name, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC, 0));
    if (fd < 0) {
        return syscall_error(env, errno, "shm_open");
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int err = errno;
        release_fd(fd);
        return syscall_error(env, err, "fstat");
    }
    if (st.st_size < 0 || (unsigned long long)st.st_size > MAX_SEGMENT_BYTES) {
        release_fd(fd);
        return syscall_error(env, EFBIG, "fstat");
    }
    size_t size = (size_t)st.st_size;
    char *addr = NULL;
    if (size > 0) {
        void *p = mmap(NULL, size, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            int err = errno;
            release_fd(fd);
            return syscall_error(env, err, "mmap");
        }
        addr = p;
    }
    release_fd(fd);
    ERL_NIF_TERM seg;
    ERL_NIF_TERM rc = make_segment(env, name, addr, size, (unsigned long long)st.st_ino, writable, &seg);
    if (rc != ATOM_OK) {
        return rc;
    }
    return enif_make_tuple4(env, ATOM_OK, seg, enif_make_uint64(env, (ErlNifUInt64)size),
                            enif_make_uint64(env, (ErlNifUInt64)st.st_ino));
}

/* Reads {Segment, Offset, Nbytes} arguments: 1 when they are valid, else 0 with *error set. */
static int
get_range(ErlNifEnv *env, ERL_NIF_TERM seg_term, ERL_NIF_TERM off_term, ERL_NIF_TERM n_term,
          segment_t **seg, size_t *offset, size_t *nbytes, ERL_NIF_TERM *error)
{
    if (!enif_get_resource(env, seg_term, SEGMENT_TYPE, (void **)seg)) {
        *error = badarg(env, "segment");
    }
    else if (!get_size(env, off_term, offset)) {
        *error = badarg(env, "offset");
    }
    else if (!get_size(env, n_term, nbytes)) {
        *error = badarg(env, "nbytes");
    }
    else if (!in_bounds((*seg)->size, *offset, *nbytes)) {
        *error = badarg(env, "bounds");
    }
    else {
        return 1;
    }
    return 0;
}

static const char *
range_ptr(segment_t *seg, size_t offset)
{
    return seg->addr != NULL ? seg->addr + offset : EMPTY_BYTES;
}

/* view(Segment, Offset, Nbytes) -> {ok, Binary} | {error, Reason}
 * A binary that IS those bytes of the mapping (no copy); it keeps the segment mapped. */
static ERL_NIF_TERM
nif_view(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
    segment_t *seg;
    size_t offset, nbytes;
    (void)argc;
    ERL_NIF_TERM err;
    if (!get_range(env, argv[0], argv[1], argv[2], &seg, &offset, &nbytes, &err)) {
        return err;
    }
    return enif_make_tuple2(env, ATOM_OK, enif_make_resource_binary(env, seg, range_ptr(seg, offset), nbytes));
}

/* -- lease resource ------------------------------------------------------------------------------ */

static void
lease_dtor(ErlNifEnv *env, void *obj)
{
    lease_t *lease = obj;
    if (lease->msg_env != NULL) {
        /* env is the callback environment of the GC that dropped the last binary. */
        (void)enif_send(env, &lease->owner, lease->msg_env, lease->msg);
        enif_free_env(lease->msg_env);
        lease->msg_env = NULL;
    }
    if (lease->segments != NULL) {
        for (unsigned i = 0; i < lease->count; i++) {
            enif_release_resource(lease->segments[i]);
        }
        enif_free(lease->segments);
        lease->segments = NULL;
    }
}

/* lease_views(Owner, Message, [{Segment, Offset, Nbytes}]) -> {ok, [Binary]} | {error, Reason}
 * Binaries of those ranges (no copy) that share one lease: when the last of them is
 * garbage-collected, Message is sent to Owner (a pid). */
static ERL_NIF_TERM
nif_lease_views(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
    ErlNifPid owner;
    unsigned count;
    (void)argc;
    if (!enif_get_local_pid(env, argv[0], &owner)) {
        return badarg(env, "owner");
    }
    if (!enif_get_list_length(env, argv[2], &count) || count == 0 || count > 65536) {
        return badarg(env, "views");
    }
    /* Check every range before anything is allocated. */
    ERL_NIF_TERM list = argv[2], head;
    while (enif_get_list_cell(env, list, &head, &list)) {
        const ERL_NIF_TERM *items;
        int arity;
        segment_t *seg;
        size_t offset, nbytes;
        if (!enif_get_tuple(env, head, &arity, &items) || arity != 3) {
            return badarg(env, "views");
        }
        ERL_NIF_TERM err;
        if (!get_range(env, items[0], items[1], items[2], &seg, &offset, &nbytes, &err)) {
            return err;
        }
    }
    lease_t *lease = enif_alloc_resource(LEASE_TYPE, sizeof(lease_t));
    if (lease == NULL) {
        return syscall_error(env, ENOMEM, "enif_alloc_resource");
    }
    memset(lease, 0, sizeof(*lease));
    lease->segments = enif_alloc(sizeof(segment_t *) * count);
    lease->msg_env = enif_alloc_env();
    ERL_NIF_TERM *bins = enif_alloc(sizeof(ERL_NIF_TERM) * count);
    if (lease->segments == NULL || lease->msg_env == NULL || bins == NULL) {
        if (lease->msg_env != NULL) {
            enif_free_env(lease->msg_env); /* before the release: the destructor must send nothing */
            lease->msg_env = NULL;
        }
        if (bins != NULL) {
            enif_free(bins);
        }
        enif_release_resource(lease); /* its destructor frees the (empty) segment array */
        return syscall_error(env, ENOMEM, "enif_alloc");
    }
    lease->owner = owner;
    lease->msg = enif_make_copy(lease->msg_env, argv[1]);

    list = argv[2];
    unsigned i = 0;
    while (enif_get_list_cell(env, list, &head, &list)) {
        const ERL_NIF_TERM *items;
        int arity;
        segment_t *seg;
        size_t offset, nbytes;
        (void)enif_get_tuple(env, head, &arity, &items);
        ERL_NIF_TERM unused;
        (void)get_range(env, items[0], items[1], items[2], &seg, &offset, &nbytes, &unused);
        enif_keep_resource(seg);
        lease->segments[i] = seg;
        lease->count = i + 1;
        bins[i] = enif_make_resource_binary(env, lease, range_ptr(seg, offset), nbytes);
        i++;
    }
    ERL_NIF_TERM result = enif_make_list_from_array(env, bins, count);
    enif_free(bins);
    enif_release_resource(lease); /* held by the binaries only: the last one's GC runs the dtor */
    return enif_make_tuple2(env, ATOM_OK, result);
}

/* -- writing ------------------------------------------------------------------------------------- */

/* write(Segment, Offset, Binary) -> ok | {error, Reason}; write_dirty/3 is the same on a dirty CPU
 * scheduler (Elixir picks it for large binaries so a long memcpy never blocks a normal scheduler). */
static ERL_NIF_TERM
nif_write(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
    segment_t *seg;
    size_t offset;
    ErlNifBinary bin;
    (void)argc;
    if (!enif_get_resource(env, argv[0], SEGMENT_TYPE, (void **)&seg)) {
        return badarg(env, "segment");
    }
    if (!get_size(env, argv[1], &offset)) {
        return badarg(env, "offset");
    }
    if (!enif_inspect_binary(env, argv[2], &bin)) {
        return badarg(env, "data");
    }
    if (!seg->writable) {
        return badarg(env, "read_only");
    }
    if (!in_bounds(seg->size, offset, bin.size)) {
        return badarg(env, "bounds");
    }
    if (bin.size > 0) {
        /* memmove: the source may be a view of this very segment */
        memmove(seg->addr + offset, bin.data, bin.size);
    }
    return ATOM_OK;
}

/* locate(Binary) -> {ok, Name, Offset, Inode, Writable} | not_found | {error, Reason}
 * Whether a binary's bytes lie inside a live mapping (a view made here, or a part of one): then a
 * tensor made of it needs no copy, only a descriptor of that segment. The binary being an argument
 * keeps its segment alive while we look. */
static ERL_NIF_TERM
nif_locate(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
    ErlNifBinary bin;
    (void)argc;
    if (!enif_inspect_binary(env, argv[0], &bin)) {
        return badarg(env, "binary");
    }
    if (bin.size == 0) {
        return ATOM_NOT_FOUND;
    }
    uintptr_t p = (uintptr_t)bin.data;
    ERL_NIF_TERM result = ATOM_NOT_FOUND;
    pthread_mutex_lock(&registry_lock);
    for (segment_t *seg = registry_head; seg != NULL; seg = seg->next) {
        uintptr_t base = (uintptr_t)seg->addr;
        if (p >= base && p - base < seg->size && bin.size <= seg->size - (p - base)) {
            ERL_NIF_TERM name;
            size_t len = strlen(seg->name);
            unsigned char *buf = enif_make_new_binary(env, len, &name);
            if (buf == NULL) {
                break;
            }
            memcpy(buf, seg->name, len);
            result = enif_make_tuple5(env, ATOM_OK, name, enif_make_uint64(env, (ErlNifUInt64)(p - base)),
                                      enif_make_uint64(env, (ErlNifUInt64)seg->inode),
                                      seg->writable ? ATOM_TRUE : ATOM_FALSE);
            break;
        }
    }
    pthread_mutex_unlock(&registry_lock);
    return result;
}

/* -- load ---------------------------------------------------------------------------------------- */

static int
load(ErlNifEnv *env, void **priv, ERL_NIF_TERM info)
{
    (void)priv;
    (void)info;
    ErlNifResourceFlags flags = ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER;
    SEGMENT_TYPE = enif_open_resource_type(env, NULL, "sidecar_segment", segment_dtor, flags, NULL);
    LEASE_TYPE = enif_open_resource_type(env, NULL, "sidecar_lease", lease_dtor, flags, NULL);
    if (SEGMENT_TYPE == NULL || LEASE_TYPE == NULL) {
        return 1;
    }
    ATOM_OK = enif_make_atom(env, "ok");
    ATOM_ERROR = enif_make_atom(env, "error");
    ATOM_BADARG = enif_make_atom(env, "badarg");
    ATOM_TRUE = enif_make_atom(env, "true");
    ATOM_FALSE = enif_make_atom(env, "false");
    ATOM_NOT_FOUND = enif_make_atom(env, "not_found");
    return 0;
}

static ErlNifFunc nif_funcs[] = {
    {"create", 2, nif_create, ERL_NIF_DIRTY_JOB_IO_BOUND},
    {"open", 2, nif_open, 0},
    {"view", 3, nif_view, 0},
    {"lease_views", 3, nif_lease_views, 0},
    {"write", 3, nif_write, 0},
    {"write_dirty", 3, nif_write, ERL_NIF_DIRTY_JOB_CPU_BOUND},
    {"locate", 1, nif_locate, 0},
};

ERL_NIF_INIT(Elixir.Sidecar.Native, nif_funcs, load, NULL, NULL, NULL)
