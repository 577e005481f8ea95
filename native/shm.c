/* sidecar._native: POSIX shared-memory segments with the buffer protocol.
 *
 * One job: create/open/map/unmap/unlink a segment and expose its bytes without a copy.
 * No policy lives here (names are checked in sidecar.dataplane.names; error mapping to our
 * structured errors is in sidecar.dataplane.segments). Every syscall is retried on EINTR and runs
 * with the GIL released; every failure is an OSError carrying errno and the segment name.
 *
 * Lifetime rule: close() never unmaps under a live buffer export (a NumPy/torch/pyarrow view).
 * It marks the segment closed and the last PyBuffer_Release does the munmap. Only exports are
 * counted: torch.frombuffer(seg) releases its buffer at once and keeps a bare pointer, so give it
 * memoryview(seg) (the memoryview holds the export) or go through numpy + torch.from_numpy.
 *
 * Private mappings (Segment.open(private=True)): MAP_PRIVATE + PROT_READ|PROT_WRITE, i.e.
 * copy-on-write. A write makes a private copy of that page; the file (the host's memory) is never
 * changed and unwritten pages keep showing its current bytes. private_pages() counts the pages
 * that were copied (read from /proc/self/pagemap), so a caller can tell a mapping that was written.
 *
 * SIGBUS: touching a page of a mapping past the end of a file that was truncated under it raises
 * SIGBUS. Every live mapping is listed in a fixed table that install_sigbus_handler()'s handler
 * reads (async-signal-safe only) to name the segment on stderr before the default action runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    PyObject *name;        /* str */
    char *addr;            /* base of the mapping; NULL when size 0 or unmapped */
    Py_ssize_t size;
    unsigned long long inode;
    char writable;         /* the buffer may be written (shared read-write, or private) */
    char private_;         /* MAP_PRIVATE copy-on-write: writes never reach the file */
    char closed;           /* close() was called (the unmap may still be pending) */
    Py_ssize_t exports;    /* live buffer exports */
    int slot;              /* index in the SIGBUS table of live mappings, -1 if not listed */
} SegmentObject;

/* ---------------------------------------------------------------------------------------------
 * The table of live mappings the SIGBUS handler reads. Writers hold the GIL (so they never race
 * each other); the handler may run at any time in any thread, so a slot is published by storing
 * its address last and withdrawn by clearing the address first. Names live inside the slots:
 * nothing the handler reads is ever freed. When the table is full a mapping is simply not listed
 * (a SIGBUS in it is then reported without its name). */
#define MAP_SLOTS 16384
#define MAP_NAME_MAX 255

typedef struct {
    _Atomic uintptr_t addr;  /* 0 = free */
    size_t size;
    unsigned long long inode;
    char name[MAP_NAME_MAX + 1];
} MapSlot;

static MapSlot map_slots[MAP_SLOTS];
static int map_free[MAP_SLOTS];  /* stack of free slot indexes */
static int map_free_count = -1;  /* -1: not initialised yet */

static int
map_table_add(const char *addr, size_t size, unsigned long long inode, PyObject *name)
{
    if (map_free_count < 0) {
        for (int i = 0; i < MAP_SLOTS; i++) {
            map_free[i] = MAP_SLOTS - 1 - i;
        }
        map_free_count = MAP_SLOTS;
    }
    if (addr == NULL || map_free_count == 0) {
        return -1;
    }
    const char *s = PyUnicode_AsUTF8(name);
    if (s == NULL) {
        PyErr_Clear();
        return -1;
    }
    int slot = map_free[--map_free_count];
    MapSlot *m = &map_slots[slot];
    size_t n = strlen(s);
    if (n > MAP_NAME_MAX) {
        n = MAP_NAME_MAX;
    }
    memcpy(m->name, s, n);
    m->name[n] = '\0';
    m->size = size;
    m->inode = inode;
    atomic_store_explicit(&m->addr, (uintptr_t)addr, memory_order_release);
    return slot;
}

static void
map_table_remove(SegmentObject *self)
{
    if (self->slot >= 0) {
        atomic_store_explicit(&map_slots[self->slot].addr, 0, memory_order_release);
        map_free[map_free_count++] = self->slot;
        self->slot = -1;
    }
}

/* OSError(errno, "<strerror>: <what> segment <name>[ (<n> bytes)]", name): the errno picks the
 * subclass (FileExistsError, FileNotFoundError, ...), the message names the segment and the bytes. */
static PyObject *
raise_os_error(int err, const char *what, PyObject *name, Py_ssize_t nbytes)
{
    PyObject *msg;
    if (nbytes >= 0) {
        msg = PyUnicode_FromFormat("%s: %s segment %S (%zd bytes)", strerror(err), what, name, nbytes);
    }
    else {
        msg = PyUnicode_FromFormat("%s: %s segment %S", strerror(err), what, name);
    }
    if (msg == NULL) {
        return NULL;
    }
    PyObject *args = Py_BuildValue("(iOO)", err, msg, name);
    Py_DECREF(msg);
    if (args == NULL) {
        return NULL;
    }
    PyObject *exc = PyObject_Call(PyExc_OSError, args, NULL);
    Py_DECREF(args);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* The name must be a str without NUL bytes; returns its UTF-8 (borrowed from the str). */
static const char *
name_utf8(PyObject *name)
{
    Py_ssize_t len;
    const char *s = PyUnicode_AsUTF8AndSize(name, &len);
    if (s == NULL) {
        return NULL;
    }
    if ((Py_ssize_t)strlen(s) != len) {
        PyErr_SetString(PyExc_ValueError, "segment name contains a NUL byte");
        return NULL;
    }
    return s;
}

static int
shm_open_retry(const char *name, int flags, mode_t mode)
{
    int fd;
    do {
        fd = shm_open(name, flags, mode);
    } while (fd < 0 && errno == EINTR);
    return fd;
}

static void
close_quietly(int fd)
{
    int saved = errno;
    (void)close(fd);  /* never retried: on Linux the fd is gone even on EINTR */
    errno = saved;
}

static void
unmap(SegmentObject *self)
{
    char *addr = self->addr;
    Py_ssize_t size = self->size;
    self->addr = NULL;  /* cleared before the GIL is dropped: nobody can export it again */
    map_table_remove(self);
    if (addr != NULL) {
        Py_BEGIN_ALLOW_THREADS
        (void)munmap(addr, (size_t)size);
        Py_END_ALLOW_THREADS
    }
}

static SegmentObject *
new_segment(PyTypeObject *cls, PyObject *name, char *addr, Py_ssize_t size, unsigned long long inode,
            int writable, int private_)
{
    SegmentObject *self = (SegmentObject *)cls->tp_alloc(cls, 0);
    if (self == NULL) {
        if (addr != NULL) {
            (void)munmap(addr, (size_t)size);
        }
        return NULL;
    }
    Py_INCREF(name);
    self->name = name;
    self->addr = addr;
    self->size = size;
    self->inode = inode;
    self->writable = (char)(writable != 0);
    self->private_ = (char)(private_ != 0);
    self->closed = 0;
    self->exports = 0;
    self->slot = map_table_add(addr, (size_t)size, inode, name);
    return self;
}

/* Segment.create(name, size, prefault=True) */
static PyObject *
Segment_create(PyObject *cls, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "size", "prefault", NULL};
    PyObject *name;
    Py_ssize_t size;
    int prefault = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Un|p:create", kwlist, &name, &size, &prefault)) {
        return NULL;
    }
    if (size < 0) {
        PyErr_Format(PyExc_ValueError, "segment size must be >= 0, got %zd", size);
        return NULL;
    }
    const char *cname = name_utf8(name);
    if (cname == NULL) {
        return NULL;
    }

    int fd = -1, err = 0;
    const char *what = NULL;
    char *addr = NULL;
    struct stat st;
    int unlink_on_error = 0;

    Py_BEGIN_ALLOW_THREADS
    do {
        fd = shm_open_retry(cname, O_CREAT | O_EXCL | O_RDWR, 0600);
        if (fd < 0) {
            err = errno; what = "cannot create"; break;
        }
        unlink_on_error = 1;
        int rc;
        do { rc = ftruncate(fd, (off_t)size); } while (rc < 0 && errno == EINTR);
        if (rc < 0) {
            err = errno; what = "cannot size"; break;
        }
        if (size > 0) {
            /* posix_fallocate returns the error number instead of setting errno. */
            do { rc = posix_fallocate(fd, 0, (off_t)size); } while (rc == EINTR);
            if (rc != 0) {
                err = rc; what = "cannot reserve space for"; break;
            }
        }
        if (fstat(fd, &st) < 0) {
            err = errno; what = "cannot stat"; break;
        }
        if (size > 0) {
            int flags = MAP_SHARED | (prefault ? MAP_POPULATE : 0);
            void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, flags, fd, 0);
            if (p == MAP_FAILED) {
                err = errno; what = "cannot map"; break;
            }
            addr = p;
        }
    } while (0);
    if (fd >= 0) {
        close_quietly(fd);
    }
    if (err != 0 && unlink_on_error) {
        (void)shm_unlink(cname);  /* leave no half-made segment behind */
    }
    Py_END_ALLOW_THREADS

    if (err != 0) {
        return raise_os_error(err, what, name, size);
    }
    return (PyObject *)new_segment((PyTypeObject *)cls, name, addr, size,
                                   (unsigned long long)st.st_ino, 1, 0);
}

/* Segment.open(name, writable=False, prefault=False, private=False) */
static PyObject *
Segment_open(PyObject *cls, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "writable", "prefault", "private", NULL};
    PyObject *name;
    int writable = 0, prefault = 0, private_ = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "U|ppp:open", kwlist, &name, &writable, &prefault,
                                     &private_)) {
        return NULL;
    }
    if (private_ && writable) {
        PyErr_SetString(PyExc_ValueError,
                        "a private mapping is copy-on-write: it never writes the file (writable=True "
                        "asks for a shared read-write mapping)");
        return NULL;
    }
    const char *cname = name_utf8(name);
    if (cname == NULL) {
        return NULL;
    }

    int fd = -1, err = 0;
    const char *what = NULL;
    char *addr = NULL;
    struct stat st;
    Py_ssize_t size = -1;

    Py_BEGIN_ALLOW_THREADS
    do {
        /* O_NONBLOCK: opening a FIFO planted under a segment name must not wait for a writer. */
        fd = shm_open_retry(cname, (writable ? O_RDWR : O_RDONLY) | O_NONBLOCK, 0);
        if (fd < 0) {
            err = errno; what = "cannot open"; break;
        }
        if (fstat(fd, &st) < 0) {
            err = errno; what = "cannot stat"; break;
        }
        if (!S_ISREG(st.st_mode)) {
            err = ENODEV; what = "refusing a non-regular file (FIFO, socket, device, directory) as"; break;
        }
        if (st.st_size < 0 || (unsigned long long)st.st_size > (unsigned long long)PY_SSIZE_T_MAX) {
            err = EOVERFLOW; what = "size out of range for"; break;
        }
        size = (Py_ssize_t)st.st_size;
        if (size > 0) {
            /* A private mapping is copy-on-write: PROT_WRITE needs no write access to the file. */
            int prot = PROT_READ | ((writable || private_) ? PROT_WRITE : 0);
            /* Never MAP_POPULATE a private writable mapping: populating it write-faults every page,
             * i.e. copies the whole segment. */
            int flags = private_ ? MAP_PRIVATE : (MAP_SHARED | (prefault ? MAP_POPULATE : 0));
            /* MAP_POPULATE here maps the (already resident) pages now instead of one fault per page. */
            void *p = mmap(NULL, (size_t)size, prot, flags, fd, 0);
            if (p == MAP_FAILED) {
                err = errno; what = "cannot map"; break;
            }
            addr = p;
        }
    } while (0);
    if (fd >= 0) {
        close_quietly(fd);
    }
    Py_END_ALLOW_THREADS

    if (err != 0) {
        return raise_os_error(err, what, name, size);
    }
    return (PyObject *)new_segment((PyTypeObject *)cls, name, addr, size,
                                   (unsigned long long)st.st_ino, writable || private_, private_);
}

/* Segment.private_pages(offset=0, nbytes=-1): pages of [offset, offset + nbytes) that this process
 * holds privately: copied on write (present and not a file page) or swapped out. A shared mapping
 * never has any; a private one has one per page an op wrote. Asked of /proc/self/pagemap: with the
 * PAGEMAP_SCAN ioctl (Linux 6.7+: the kernel walks the page tables and reports only matching runs,
 * ~10x less work than reading 8 bytes per page), else by reading the entries (bit 63 present, 62
 * swapped, 61 file-page or shared-anon). The descriptor is opened per call: one kept across fork()
 * would read the parent's page tables. */
#define PM_PRESENT (1ULL << 63)
#define PM_SWAPPED (1ULL << 62)
#define PM_FILE_OR_SHARED (1ULL << 61)
#define PAGEMAP_CHUNK 512  /* entries per pread: 4 KiB of pagemap covers 2 MiB of mapping */

/* From <linux/fs.h> (6.7), absent from older headers. */
struct sc_page_region { uint64_t start, end, categories; };
struct sc_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask,
        category_anyof_mask, return_mask;
};
#define SC_PAGEMAP_SCAN _IOWR('f', 16, struct sc_pm_scan_arg)
#define SC_PAGE_IS_FILE (1ULL << 2)
#define SC_PAGE_IS_PRESENT (1ULL << 3)
#define SC_PAGE_IS_SWAPPED (1ULL << 4)
#define SCAN_REGIONS 64

/* Pages of [start, end) (page-aligned addresses) held privately, by PAGEMAP_SCAN; -1 with errno
 * ENOTTY/EINVAL when the kernel lacks it, -1 with another errno on failure. */
static long long
count_private_scan(int fd, uintptr_t start, uintptr_t end, uintptr_t page)
{
    struct sc_page_region regions[SCAN_REGIONS];
    long long count = 0;
    while (start < end) {
        struct sc_pm_scan_arg arg;
        memset(&arg, 0, sizeof(arg));
        arg.size = sizeof(arg);
        arg.start = start;
        arg.end = end;
        arg.vec = (uint64_t)(uintptr_t)regions;
        arg.vec_len = SCAN_REGIONS;
        arg.category_inverted = SC_PAGE_IS_FILE;  /* not a file page ... */
        arg.category_mask = SC_PAGE_IS_FILE;
        arg.category_anyof_mask = SC_PAGE_IS_PRESENT | SC_PAGE_IS_SWAPPED;  /* ... and present or swapped */
        arg.return_mask = SC_PAGE_IS_PRESENT | SC_PAGE_IS_SWAPPED;
        int n;
        do { n = ioctl(fd, SC_PAGEMAP_SCAN, &arg); } while (n < 0 && errno == EINTR);
        if (n < 0) {
            return -1;
        }
        for (int i = 0; i < n; i++) {
            count += (long long)((regions[i].end - regions[i].start) / page);
        }
        if (arg.walk_end <= start) {
            errno = EIO;
            return -1;
        }
        start = arg.walk_end;
    }
    return count;
}

static long long
count_private_read(int fd, uintptr_t first, uintptr_t last)
{
    uint64_t entries[PAGEMAP_CHUNK];
    long long count = 0;
    for (uintptr_t vpn = first; vpn <= last;) {
        size_t want = (size_t)(last - vpn + 1);
        if (want > PAGEMAP_CHUNK) {
            want = PAGEMAP_CHUNK;
        }
        ssize_t got;
        do {
            got = pread(fd, entries, want * sizeof(uint64_t), (off_t)(vpn * sizeof(uint64_t)));
        } while (got < 0 && errno == EINTR);
        if (got <= 0 || got % (ssize_t)sizeof(uint64_t) != 0) {
            if (got >= 0) {
                errno = EIO;
            }
            return -1;
        }
        size_t n = (size_t)got / sizeof(uint64_t);
        for (size_t i = 0; i < n; i++) {
            uint64_t e = entries[i];
            if (((e & PM_PRESENT) && !(e & PM_FILE_OR_SHARED)) || (e & PM_SWAPPED)) {
                count++;
            }
        }
        vpn += n;
    }
    return count;
}

static int pagemap_scan_missing = 0;  /* the kernel refused PAGEMAP_SCAN once: read entries from then on */

static PyObject *
Segment_private_pages(SegmentObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"offset", "nbytes", NULL};
    Py_ssize_t offset = 0, nbytes = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|nn:private_pages", kwlist, &offset, &nbytes)) {
        return NULL;
    }
    if (self->addr == NULL || self->size == 0) {
        return PyLong_FromLong(0);
    }
    if (nbytes < 0) {
        nbytes = self->size - (offset < self->size ? offset : self->size);
    }
    if (offset < 0 || offset > self->size || nbytes > self->size - offset) {
        PyErr_Format(PyExc_ValueError, "range [%zd, +%zd) is outside segment %S (%zd bytes)", offset, nbytes,
                     self->name, self->size);
        return NULL;
    }
    if (nbytes == 0) {
        return PyLong_FromLong(0);
    }
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t first = ((uintptr_t)self->addr + (uintptr_t)offset) / page;
    uintptr_t last = ((uintptr_t)self->addr + (uintptr_t)offset + (uintptr_t)nbytes - 1) / page;
    long long count = -1;
    int err = 0, scan_missing = pagemap_scan_missing;
    const char *what = NULL;

    self->exports++;  /* the range stays mapped while the GIL is released */
    Py_BEGIN_ALLOW_THREADS
    int fd;
    do { fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC); } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        err = errno; what = "cannot open /proc/self/pagemap to inspect";
    }
    else {
        if (!scan_missing) {
            count = count_private_scan(fd, first * page, (last + 1) * page, page);
            if (count < 0 && (errno == ENOTTY || errno == EINVAL || errno == EOPNOTSUPP)) {
                scan_missing = 1;
            }
            else if (count < 0) {
                err = errno; what = "PAGEMAP_SCAN failed for";
            }
        }
        if (scan_missing) {
            count = count_private_read(fd, first, last);
            if (count < 0) {
                err = errno; what = "cannot read /proc/self/pagemap for";
            }
        }
        close_quietly(fd);
    }
    Py_END_ALLOW_THREADS
    pagemap_scan_missing = scan_missing;
    self->exports--;
    if (self->exports == 0 && self->closed) {
        unmap(self);
    }

    if (err != 0) {
        return raise_os_error(err, what, self->name, -1);
    }
    return PyLong_FromLongLong(count);
}

/* Segment.file_size(): the size of the file behind this segment's name now, or -1 when the name is
 * gone or names another file (it was unlinked, or re-created: another inode) or not a regular file.
 * One stat of /dev/shm/<name> (where glibc's shm_open keeps segments), without the GIL dance: it
 * never blocks. What a cache checks before serving a mapping whose file may have been truncated. */
static PyObject *
Segment_file_size(SegmentObject *self, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t len;
    const char *name = PyUnicode_AsUTF8AndSize(self->name, &len);
    if (name == NULL) {
        return NULL;
    }
    char path[sizeof("/dev/shm/") + MAP_NAME_MAX + 1];
    if (name[0] == '/') {
        name++;
        len--;
    }
    if (len > MAP_NAME_MAX) {
        return PyLong_FromLong(-1);
    }
    memcpy(path, "/dev/shm/", sizeof("/dev/shm/") - 1);
    memcpy(path + sizeof("/dev/shm/") - 1, name, (size_t)len + 1);
    struct stat st;
    int rc;
    do { rc = stat(path, &st); } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        if (errno == ENOENT || errno == ENOTDIR) {
            return PyLong_FromLong(-1);
        }
        return raise_os_error(errno, "cannot stat", self->name, -1);
    }
    if (!S_ISREG(st.st_mode) || (unsigned long long)st.st_ino != self->inode) {
        return PyLong_FromLong(-1);
    }
    return PyLong_FromLongLong((long long)st.st_size);
}

/* Segment.zero(start, stop): memset [start, stop) to 0 (arena blocks handed out again). */
static PyObject *
Segment_zero(SegmentObject *self, PyObject *args)
{
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "nn:zero", &start, &stop)) {
        return NULL;
    }
    if (self->closed || self->addr == NULL) {
        if (start == stop && stop == 0 && !self->closed) {
            Py_RETURN_NONE;  /* a zero-size segment */
        }
        PyErr_Format(PyExc_ValueError, "segment %S is closed", self->name);
        return NULL;
    }
    if (!self->writable) {
        PyErr_Format(PyExc_BufferError, "segment %S is mapped read-only", self->name);
        return NULL;
    }
    if (start < 0 || stop < start || stop > self->size) {
        PyErr_Format(PyExc_ValueError, "range [%zd, %zd) is outside segment %S (%zd bytes)", start, stop,
                     self->name, self->size);
        return NULL;
    }
    char *p = self->addr + start;
    size_t n = (size_t)(stop - start);
    if (n >= (1u << 20)) {
        self->exports++;  /* a close() from another thread meanwhile defers the unmap until we are done */
        Py_BEGIN_ALLOW_THREADS
        memset(p, 0, n);
        Py_END_ALLOW_THREADS
        self->exports--;
        if (self->exports == 0 && self->closed) {
            unmap(self);
        }
    }
    else {
        memset(p, 0, n);
    }
    Py_RETURN_NONE;
}

static PyObject *
Segment_close(SegmentObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->closed) {
        self->closed = 1;
        if (self->exports == 0) {
            unmap(self);
        }
    }
    Py_RETURN_NONE;
}

static PyObject *
Segment_enter(SegmentObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->closed) {
        PyErr_Format(PyExc_ValueError, "segment %S is closed", self->name);
        return NULL;
    }
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *
Segment_exit(SegmentObject *self, PyObject *Py_UNUSED(args))
{
    return Segment_close(self, NULL);
}

static PyObject *
Segment_get_address(SegmentObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromVoidPtr(self->addr);
}

static PyObject *
Segment_get_writable(SegmentObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->writable);
}

static PyObject *
Segment_get_closed(SegmentObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->closed);
}

static int
Segment_getbuffer(SegmentObject *self, Py_buffer *view, int flags)
{
    if (self->closed) {
        PyErr_Format(PyExc_ValueError, "segment %S is closed", self->name);
        view->obj = NULL;
        return -1;
    }
    if ((flags & PyBUF_WRITABLE) && !self->writable) {
        PyErr_Format(PyExc_BufferError, "segment %S is mapped read-only", self->name);
        view->obj = NULL;
        return -1;
    }
    /* A zero-size segment has no mapping; hand out a valid, empty, non-NULL pointer. */
    void *buf = self->addr != NULL ? (void *)self->addr : (void *)&self->exports;
    if (PyBuffer_FillInfo(view, (PyObject *)self, buf, self->size, !self->writable, flags) < 0) {
        return -1;
    }
    self->exports++;
    return 0;
}

static void
Segment_releasebuffer(SegmentObject *self, Py_buffer *Py_UNUSED(view))
{
    self->exports--;
    if (self->exports == 0 && self->closed) {
        unmap(self);  /* the deferred unmap of close() */
    }
}

static PyObject *
Segment_repr(SegmentObject *self)
{
    return PyUnicode_FromFormat("<Segment %R size=%zd inode=%llu %s%s>", self->name, self->size,
                                self->inode, self->private_ ? "private" : self->writable ? "rw" : "ro",
                                self->closed ? " closed" : "");
}

static void
Segment_dealloc(SegmentObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    /* A live export holds a reference to us, so no view can outlive this unmap. */
    map_table_remove(self);
    if (self->addr != NULL) {
        (void)munmap(self->addr, (size_t)self->size);
        self->addr = NULL;
    }
    Py_CLEAR(self->name);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef Segment_methods[] = {
    {"create", (PyCFunction)(void (*)(void))Segment_create, METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     "create($type, name, size, prefault=True)\n--\n\ncreate(name, size, prefault=True) -> Segment\n\n"
     "Create a new segment (O_EXCL, mode 0600), reserve its space and map it read-write."},
    {"open", (PyCFunction)(void (*)(void))Segment_open, METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     "open($type, name, writable=False, prefault=False, private=False)\n--\n\nopen(name, writable=False, prefault=False, private=False) -> Segment\n\n"
     "Map an existing regular file segment (opened O_NONBLOCK; anything else is refused with ENODEV);\n"
     "size and inode come from fstat. private=True maps it copy-on-write (MAP_PRIVATE, writable)."},
    {"private_pages", (PyCFunction)(void (*)(void))Segment_private_pages, METH_VARARGS | METH_KEYWORDS,
     "private_pages($self, offset=0, nbytes=-1)\n--\n\nprivate_pages(offset=0, nbytes=-1) -> int\n\n"
     "Pages of the range this process holds privately (written into a private mapping), from\n"
     "/proc/self/pagemap. 0 for a mapping nobody wrote (and for every shared mapping)."},
    {"file_size", (PyCFunction)Segment_file_size, METH_NOARGS,
     "file_size($self, /)\n--\n\nfile_size() -> int\n\n"
     "Size of the file behind the segment's name now (one stat); -1 when the name is gone or names\n"
     "another file (unlinked or re-created) or not a regular file."},
    {"zero", (PyCFunction)Segment_zero, METH_VARARGS,
     "zero($self, start, stop, /)\n--\n\nzero(start, stop) -> None\n\nSet bytes [start, stop) of a writable mapping to 0."},
    {"close", (PyCFunction)Segment_close, METH_NOARGS,
     "close($self, /)\n--\n\nclose() -> None\n\nIdempotent. The unmap waits for the last exported buffer to be released."},
    {"__enter__", (PyCFunction)Segment_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Segment_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Segment_members[] = {
    {"name", T_OBJECT_EX, offsetof(SegmentObject, name), READONLY, "segment name"},
    {"size", T_PYSSIZET, offsetof(SegmentObject, size), READONLY, "size in bytes"},
    {"inode", T_ULONGLONG, offsetof(SegmentObject, inode), READONLY, "st_ino of the segment"},
    {"exports", T_PYSSIZET, offsetof(SegmentObject, exports), READONLY, "live buffer exports"},
    {"private", T_BOOL, offsetof(SegmentObject, private_), READONLY,
     "mapped copy-on-write (MAP_PRIVATE): writes never reach the file"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Segment_getset[] = {
    {"address", (getter)Segment_get_address, NULL, "base address of the mapping (0 when unmapped)", NULL},
    {"writable", (getter)Segment_get_writable, NULL, "mapped read-write", NULL},
    {"closed", (getter)Segment_get_closed, NULL, "close() was called", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Segment_slots[] = {
    {Py_tp_doc, "A mapped POSIX shared-memory segment (use Segment.create / Segment.open)."},
    {Py_tp_dealloc, Segment_dealloc},
    {Py_tp_repr, Segment_repr},
    {Py_tp_methods, Segment_methods},
    {Py_tp_members, Segment_members},
    {Py_tp_getset, Segment_getset},
    {Py_bf_getbuffer, Segment_getbuffer},
    {Py_bf_releasebuffer, Segment_releasebuffer},
    {0, NULL},
};

static PyType_Spec Segment_spec = {
    .name = "sidecar._native.Segment",
    .basicsize = sizeof(SegmentObject),
    .itemsize = 0,
    /* No Py_tpflags_BASETYPE; no tp_new: segments are made by create/open only. */
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Segment_slots,
};

/* unlink(name) */
static PyObject *
native_unlink(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *name;
    if (!PyArg_ParseTuple(args, "U:unlink", &name)) {
        return NULL;
    }
    const char *cname = name_utf8(name);
    if (cname == NULL) {
        return NULL;
    }
    int rc, err = 0;
    Py_BEGIN_ALLOW_THREADS
    do { rc = shm_unlink(cname); } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        err = errno;
    }
    Py_END_ALLOW_THREADS
    if (err != 0) {
        return raise_os_error(err, "cannot unlink", name, -1);
    }
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------------------
 * SIGBUS: name the segment, then let the previous handler (faulthandler, or the default action)
 * run. Only async-signal-safe calls here: stat, write, sigaction, raise. */

static struct sigaction sigbus_previous;
static int sigbus_installed = 0;

typedef struct {
    char buf[640];
    size_t len;
} Line;

static void
line_str(Line *l, const char *s)
{
    while (*s && l->len < sizeof(l->buf) - 1) {
        l->buf[l->len++] = *s++;
    }
}

static void
line_num(Line *l, unsigned long long v, unsigned base)
{
    char tmp[32];
    int n = 0;
    do {
        unsigned d = (unsigned)(v % base);
        tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v && n < (int)sizeof(tmp));
    while (n > 0 && l->len < sizeof(l->buf) - 1) {
        l->buf[l->len++] = tmp[--n];
    }
}

static void
sigbus_report(uintptr_t fault)
{
    Line l = {.len = 0};
    line_str(&l, "sidecar: SIGBUS at 0x");
    line_num(&l, fault, 16);
    const MapSlot *hit = NULL;
    for (int i = 0; i < MAP_SLOTS; i++) {
        uintptr_t base = atomic_load_explicit(&map_slots[i].addr, memory_order_acquire);
        if (base != 0 && fault >= base && fault - base < map_slots[i].size) {
            hit = &map_slots[i];
            break;
        }
    }
    if (hit == NULL) {
        line_str(&l, ", outside every mapped shared-memory segment\n");
    }
    else {
        line_str(&l, " inside segment ");
        line_str(&l, hit->name);
        line_str(&l, " (mapped ");
        line_num(&l, hit->size, 10);
        line_str(&l, " bytes, file now ");
        char path[sizeof("/dev/shm/") + MAP_NAME_MAX + 1];
        size_t n = 0;
        for (const char *s = "/dev/shm/"; *s; s++) {
            path[n++] = *s;
        }
        for (const char *s = hit->name[0] == '/' ? hit->name + 1 : hit->name; *s; s++) {
            path[n++] = *s;
        }
        path[n] = '\0';
        struct stat st;
        if (stat(path, &st) == 0 && (unsigned long long)st.st_ino == hit->inode) {
            line_num(&l, (unsigned long long)st.st_size, 10);
            line_str(&l, " bytes)");
        }
        else {
            line_str(&l, "unlinked)");
        }
        line_str(&l, ": it was truncated while mapped\n");
    }
    size_t off = 0;
    while (off < l.len) {
        ssize_t w = write(2, l.buf + off, l.len - off);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            break;
        }
        off += (size_t)w;
    }
}

static void
sigbus_handler(int signum, siginfo_t *info, void *context)
{
    (void)context;
    int saved = errno;
    if (info != NULL && info->si_code > 0) {  /* a fault, not a kill(): si_addr is the address */
        sigbus_report((uintptr_t)info->si_addr);
    }
    sigaction(SIGBUS, &sigbus_previous, NULL);
    errno = saved;
    if (info == NULL || info->si_code <= 0) {
        raise(signum);  /* delivered to the previous handler once we return */
    }
    /* A fault: returning re-runs the access, which faults again into the previous handler. */
}

/* install_sigbus_handler() */
static PyObject *
native_install_sigbus_handler(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    if (!sigbus_installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = sigbus_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &sigbus_previous) < 0) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        sigbus_installed = 1;
    }
    Py_RETURN_NONE;
}

static PyMethodDef native_methods[] = {
    {"unlink", native_unlink, METH_VARARGS,
     "unlink($module, name, /)\n--\n\nunlink(name) -> None\n\nRemove a segment's name (FileNotFoundError when absent). Mappings stay valid."},
    {"install_sigbus_handler", native_install_sigbus_handler, METH_NOARGS,
     "install_sigbus_handler($module, /)\n--\n\ninstall_sigbus_handler() -> None\n\n"
     "On a SIGBUS inside a mapped segment (its file was truncated), write 'sidecar: SIGBUS at ...\n"
     "inside segment NAME (mapped N bytes, file now M bytes)' to stderr, then hand the signal to the\n"
     "handler that was installed before (faulthandler's, or the default action). Idempotent. Install it\n"
     "after faulthandler.enable(), so that this handler sees the fault first."},
    {NULL, NULL, 0, NULL},
};

static int
native_exec(PyObject *module)
{
    PyObject *type = PyType_FromModuleAndSpec(module, &Segment_spec, NULL);
    if (type == NULL) {
        return -1;
    }
    int rc = PyModule_AddObjectRef(module, "Segment", type);
    Py_DECREF(type);
    if (rc < 0) {
        return -1;
    }
    if (PyModule_AddIntConstant(module, "PAGE_SIZE", sysconf(_SC_PAGESIZE)) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot native_slots[] = {
    {Py_mod_exec, native_exec},
    {0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sidecar._native",
    .m_doc = "POSIX shared-memory segments with the buffer protocol (no policy: see sidecar.dataplane).",
    .m_size = 0,
    .m_methods = native_methods,
    .m_slots = native_slots,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModuleDef_Init(&native_module);
}
