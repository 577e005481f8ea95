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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    PyObject *name;        /* str */
    char *addr;            /* base of the mapping; NULL when size 0 or unmapped */
    Py_ssize_t size;
    unsigned long long inode;
    char writable;
    char closed;           /* close() was called (the unmap may still be pending) */
    Py_ssize_t exports;    /* live buffer exports */
} SegmentObject;

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
    if (addr != NULL) {
        Py_BEGIN_ALLOW_THREADS
        (void)munmap(addr, (size_t)size);
        Py_END_ALLOW_THREADS
    }
}

static SegmentObject *
new_segment(PyTypeObject *cls, PyObject *name, char *addr, Py_ssize_t size, unsigned long long inode,
            int writable)
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
    self->closed = 0;
    self->exports = 0;
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
                                   (unsigned long long)st.st_ino, 1);
}

/* Segment.open(name, writable=False, prefault=False) */
static PyObject *
Segment_open(PyObject *cls, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "writable", "prefault", NULL};
    PyObject *name;
    int writable = 0, prefault = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "U|pp:open", kwlist, &name, &writable, &prefault)) {
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
        fd = shm_open_retry(cname, writable ? O_RDWR : O_RDONLY, 0);
        if (fd < 0) {
            err = errno; what = "cannot open"; break;
        }
        if (fstat(fd, &st) < 0) {
            err = errno; what = "cannot stat"; break;
        }
        if (st.st_size < 0 || (unsigned long long)st.st_size > (unsigned long long)PY_SSIZE_T_MAX) {
            err = EOVERFLOW; what = "size out of range for"; break;
        }
        size = (Py_ssize_t)st.st_size;
        if (size > 0) {
            int prot = PROT_READ | (writable ? PROT_WRITE : 0);
            /* MAP_POPULATE here maps the (already resident) pages now instead of one fault per page. */
            void *p = mmap(NULL, (size_t)size, prot, MAP_SHARED | (prefault ? MAP_POPULATE : 0), fd, 0);
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
                                   (unsigned long long)st.st_ino, writable);
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
                                self->inode, self->writable ? "rw" : "ro",
                                self->closed ? " closed" : "");
}

static void
Segment_dealloc(SegmentObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    /* A live export holds a reference to us, so no view can outlive this unmap. */
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
     "create(name, size, prefault=True) -> Segment\n\n"
     "Create a new segment (O_EXCL, mode 0600), reserve its space and map it read-write."},
    {"open", (PyCFunction)(void (*)(void))Segment_open, METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     "open(name, writable=False, prefault=False) -> Segment\n\n"
     "Map an existing segment; size and inode come from fstat."},
    {"close", (PyCFunction)Segment_close, METH_NOARGS,
     "close() -> None\n\nIdempotent. The unmap waits for the last exported buffer to be released."},
    {"__enter__", (PyCFunction)Segment_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Segment_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Segment_members[] = {
    {"name", T_OBJECT_EX, offsetof(SegmentObject, name), READONLY, "segment name"},
    {"size", T_PYSSIZET, offsetof(SegmentObject, size), READONLY, "size in bytes"},
    {"inode", T_ULONGLONG, offsetof(SegmentObject, inode), READONLY, "st_ino of the segment"},
    {"exports", T_PYSSIZET, offsetof(SegmentObject, exports), READONLY, "live buffer exports"},
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

static PyMethodDef native_methods[] = {
    {"unlink", native_unlink, METH_VARARGS,
     "unlink(name) -> None\n\nRemove a segment's name (FileNotFoundError when absent). Mappings stay valid."},
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
