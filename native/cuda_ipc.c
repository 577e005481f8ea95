/* sidecar._cudaipc: CUDA IPC memory handles through the CUDA driver API, loaded at run time.
 *
 * One job: export a device pointer as a CUipcMemHandle (plus its offset from the allocation base),
 * open/close such handles, page-lock (register) host memory, and wrap a device pointer as a DLPack
 * capsule so torch can view it without a copy. Policy (caching of opened handles, uuid -> device,
 * structured errors) lives in sidecar.dataplane.cuda_ipc.
 *
 * libcuda.so.1 is dlopen()ed at the first call that needs it, never at import, so the package
 * builds and imports on machines without CUDA and a process that only imports us stays fork-safe.
 * Every driver call runs with the GIL released and its CUresult is checked; a failure raises
 * CudaError(call, code, name) whose message names the call, the CUresult and the pointer/bytes.
 * A missing or unusable driver raises CudaUnavailableError (a CudaError subclass).
 *
 * Driver calls that need a context run in the device's primary context (the one torch uses), made
 * current for the duration of the call and the caller's context restored afterwards.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------------------------
 * The few driver types and constants we use (values from cuda.h; stable ABI). */

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
#define IPC_HANDLE_SIZE 64
typedef struct { char reserved[IPC_HANDLE_SIZE]; } CUipcMemHandle;
typedef struct { unsigned char bytes[16]; } CUuuid;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712,
    CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};
enum {
    CU_POINTER_ATTRIBUTE_BUFFER_ID = 7,
    CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9,
    CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10,
};
#define CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS 0x1u
#define CU_MEMHOSTREGISTER_PORTABLE 0x01u
#define CU_MEMHOSTREGISTER_READ_ONLY 0x08u

/* Pseudo-codes for failures that are not a CUresult of a call. */
#define CODE_UNAVAILABLE (-1)

/* ---------------------------------------------------------------------------------------------
 * The driver's entry points, resolved by dlsym. Versioned names first (cuda.h maps the plain names
 * to these); the unversioned fallback only where its signature is identical. */

static struct {
    CUresult (*Init)(unsigned int);
    CUresult (*DriverGetVersion)(int *);
    CUresult (*DeviceGetCount)(int *);
    CUresult (*DeviceGet)(CUdevice *, int);
    CUresult (*DeviceGetUuid)(CUuuid *, CUdevice);
    CUresult (*DevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*CtxGetCurrent)(CUcontext *);
    CUresult (*CtxSetCurrent)(CUcontext);
    CUresult (*CtxSynchronize)(void);
    CUresult (*MemGetAddressRange)(CUdeviceptr *, size_t *, CUdeviceptr);
    CUresult (*MemGetInfo)(size_t *, size_t *);
    CUresult (*PointerGetAttribute)(void *, int, CUdeviceptr);
    CUresult (*IpcGetMemHandle)(CUipcMemHandle *, CUdeviceptr);
    CUresult (*IpcOpenMemHandle)(CUdeviceptr *, CUipcMemHandle, unsigned int);
    CUresult (*IpcCloseMemHandle)(CUdeviceptr);
    CUresult (*MemHostRegister)(void *, size_t, unsigned int);
    CUresult (*MemHostUnregister)(void *);
    CUresult (*GetErrorName)(CUresult, const char **);
    CUresult (*GetErrorString)(CUresult, const char **);
} cu;

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static int loaded_ok;
static pid_t loaded_pid;
static int device_count;
static int driver_version;
static char load_error[768];

#define MAX_DEVICES 64
static pthread_mutex_t ctx_lock = PTHREAD_MUTEX_INITIALIZER;
static CUcontext primary_ctx[MAX_DEVICES]; /* retained once per device, for the process lifetime */

static PyObject *CudaError;            /* RuntimeError subclass: .call, .code, .name */
static PyObject *CudaUnavailableError; /* CudaError subclass: no usable driver */

static const char *
err_name(CUresult r)
{
    const char *s = NULL;
    if (cu.GetErrorName == NULL || cu.GetErrorName(r, &s) != CUDA_SUCCESS || s == NULL) {
        return "CUDA_ERROR_UNKNOWN_CODE";
    }
    return s;
}

static const char *
err_string(CUresult r)
{
    const char *s = NULL;
    if (cu.GetErrorString == NULL || cu.GetErrorString(r, &s) != CUDA_SUCCESS || s == NULL) {
        return "no description";
    }
    return s;
}

static void *
resolve(void *lib, const char *versioned, const char *plain)
{
    void *f = versioned ? dlsym(lib, versioned) : NULL;
    if (f == NULL && plain != NULL) {
        f = dlsym(lib, plain);
    }
    if (f == NULL) {
        snprintf(load_error, sizeof load_error,
                 "the CUDA driver library has no %s: the NVIDIA driver is too old for CUDA IPC "
                 "(install a driver for CUDA 11.4 or newer)", versioned ? versioned : plain);
    }
    return f;
}

/* Runs once per process (pthread_once), without the GIL. Fills `cu` or `load_error`. */
static void
do_load(void)
{
    const char *path = getenv("SIDECAR_LIBCUDA"); /* tests point this at another library */
    if (path == NULL || path[0] == '\0') {
        path = "libcuda.so.1";
    }
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        const char *why = dlerror();
        snprintf(load_error, sizeof load_error,
                 "CUDA is not available: the NVIDIA driver library %s could not be loaded (%s); "
                 "CUDA IPC needs an NVIDIA GPU with its driver installed",
                 path, why ? why : "unknown reason");
        return;
    }
#define RESOLVE(field, versioned, plain)                                 \
    if ((*(void **)(&cu.field) = resolve(lib, versioned, plain)) == NULL) \
        goto fail;
    RESOLVE(GetErrorName, "cuGetErrorName", NULL)
    RESOLVE(GetErrorString, "cuGetErrorString", NULL)
    RESOLVE(Init, "cuInit", NULL)
    RESOLVE(DriverGetVersion, "cuDriverGetVersion", NULL)
    RESOLVE(DeviceGetCount, "cuDeviceGetCount", NULL)
    RESOLVE(DeviceGet, "cuDeviceGet", NULL)
    RESOLVE(DeviceGetUuid, "cuDeviceGetUuid_v2", "cuDeviceGetUuid")
    RESOLVE(DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", NULL)
    RESOLVE(CtxGetCurrent, "cuCtxGetCurrent", NULL)
    RESOLVE(CtxSetCurrent, "cuCtxSetCurrent", NULL)
    RESOLVE(CtxSynchronize, "cuCtxSynchronize", NULL)
    RESOLVE(MemGetAddressRange, "cuMemGetAddressRange_v2", NULL) /* the plain name is 32-bit */
    RESOLVE(MemGetInfo, "cuMemGetInfo_v2", NULL)
    RESOLVE(PointerGetAttribute, "cuPointerGetAttribute", NULL)
    RESOLVE(IpcGetMemHandle, "cuIpcGetMemHandle", NULL)
    RESOLVE(IpcOpenMemHandle, "cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle")
    RESOLVE(IpcCloseMemHandle, "cuIpcCloseMemHandle", NULL)
    RESOLVE(MemHostRegister, "cuMemHostRegister_v2", "cuMemHostRegister")
    RESOLVE(MemHostUnregister, "cuMemHostUnregister", NULL)
#undef RESOLVE
    CUresult r = cu.Init(0);
    if (r != CUDA_SUCCESS) {
        snprintf(load_error, sizeof load_error,
                 "CUDA is not available: cuInit failed with %s (%s)", err_name(r), err_string(r));
        goto fail;
    }
    r = cu.DeviceGetCount(&device_count);
    if (r != CUDA_SUCCESS) {
        snprintf(load_error, sizeof load_error,
                 "CUDA is not available: cuDeviceGetCount failed with %s (%s)", err_name(r), err_string(r));
        goto fail;
    }
    if (cu.DriverGetVersion(&driver_version) != CUDA_SUCCESS) {
        driver_version = 0;
    }
    loaded_pid = getpid();
    loaded_ok = 1;
    return;
fail:
    /* loaded_ok stays 0, so nothing but the error strings is ever used; the library stays loaded. */
    return;
}

static PyObject *
make_error(PyObject *type, const char *call, int code, const char *name, PyObject *msg)
{
    PyObject *exc = PyObject_CallOneArg(type, msg);
    if (exc == NULL) {
        return NULL;
    }
    PyObject *pcode = PyLong_FromLong(code);
    PyObject *pname = PyUnicode_FromString(name);
    PyObject *pcall = PyUnicode_FromString(call);
    int bad = pcode == NULL || pname == NULL || pcall == NULL ||
              PyObject_SetAttrString(exc, "code", pcode) < 0 ||
              PyObject_SetAttrString(exc, "name", pname) < 0 ||
              PyObject_SetAttrString(exc, "call", pcall) < 0;
    Py_XDECREF(pcode);
    Py_XDECREF(pname);
    Py_XDECREF(pcall);
    if (bad) {
        Py_DECREF(exc);
        return NULL;
    }
    PyErr_SetObject(type, exc);
    Py_DECREF(exc);
    return NULL;
}

/* Raises CudaError for `r` returned by `call`; `what` says what it was applied to. */
static PyObject *
raise_cu(const char *call, CUresult r, const char *what)
{
    const char *name = err_name(r);
    PyObject *msg = PyUnicode_FromFormat("%s(%s) failed: %s (%s)", call, what, name, err_string(r));
    if (msg == NULL) {
        return NULL;
    }
    make_error(CudaError, call, r, name, msg);
    Py_DECREF(msg);
    return NULL;
}

static PyObject *
raise_unavailable(const char *text)
{
    PyObject *msg = PyUnicode_FromString(text);
    if (msg == NULL) {
        return NULL;
    }
    make_error(CudaUnavailableError, "dlopen", CODE_UNAVAILABLE, "CUDA_UNAVAILABLE", msg);
    Py_DECREF(msg);
    return NULL;
}

/* 0 when the driver is usable in this process, else -1 with CudaUnavailableError set. */
static int
ensure_loaded(void)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_once(&load_once, do_load);
    Py_END_ALLOW_THREADS
    if (!loaded_ok) {
        raise_unavailable(load_error);
        return -1;
    }
    if (getpid() != loaded_pid) {
        char text[300];
        snprintf(text, sizeof text,
                 "CUDA is not usable in process %d: the driver was initialised in process %d before "
                 "it forked this one, and CUDA does not survive fork (start workers with spawn, or "
                 "keep CUDA out of the process that forks them)", (int)getpid(), (int)loaded_pid);
        raise_unavailable(text);
        return -1;
    }
    return 0;
}

static int
as_int(PyObject *o, const char *what, int *out)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (v < INT32_MIN || v > INT32_MAX) {
        PyErr_Format(PyExc_OverflowError, "%s %ld is out of range", what, v);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int
check_device(int dev)
{
    if (dev < 0 || dev >= device_count || dev >= MAX_DEVICES) {
        PyErr_Format(PyExc_ValueError, "CUDA device ordinal %d does not exist: %d device(s) are visible",
                     dev, device_count);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Primary-context guard (called without the GIL). On failure `*call` names the failing call. */

typedef struct {
    CUcontext saved;
    int switched;
} ctx_guard;

static CUresult
ctx_enter(int dev, ctx_guard *g, const char **call)
{
    CUresult r = CUDA_SUCCESS;
    g->switched = 0;
    pthread_mutex_lock(&ctx_lock);
    if (primary_ctx[dev] == NULL) {
        CUdevice d;
        *call = "cuDeviceGet";
        r = cu.DeviceGet(&d, dev);
        if (r == CUDA_SUCCESS) {
            *call = "cuDevicePrimaryCtxRetain";
            r = cu.DevicePrimaryCtxRetain(&primary_ctx[dev], d);
        }
    }
    CUcontext primary = primary_ctx[dev];
    pthread_mutex_unlock(&ctx_lock);
    if (r != CUDA_SUCCESS) {
        return r;
    }
    *call = "cuCtxGetCurrent";
    r = cu.CtxGetCurrent(&g->saved);
    if (r != CUDA_SUCCESS) {
        return r;
    }
    if (g->saved != primary) {
        *call = "cuCtxSetCurrent";
        r = cu.CtxSetCurrent(primary);
        if (r != CUDA_SUCCESS) {
            return r;
        }
        g->switched = 1;
    }
    return CUDA_SUCCESS;
}

static void
ctx_leave(ctx_guard *g)
{
    if (g->switched) {
        (void)cu.CtxSetCurrent(g->saved); /* restoring the caller's context cannot be reported */
        g->switched = 0;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Argument helpers */

static int
as_u64(PyObject *o, const char *what, unsigned long long *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what, Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_OverflowError, "%s must be in [0, 2**64)", what);
        return -1;
    }
    *out = v;
    return 0;
}

static int
as_handle(PyObject *o, CUipcMemHandle *h)
{
    Py_buffer view;
    if (PyObject_GetBuffer(o, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Format(PyExc_TypeError, "a CUDA IPC handle must be bytes, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    if (view.len != IPC_HANDLE_SIZE) {
        PyErr_Format(PyExc_ValueError, "a CUDA IPC handle is exactly %d bytes, got %zd",
                     IPC_HANDLE_SIZE, view.len);
        PyBuffer_Release(&view);
        return -1;
    }
    memcpy(h->reserved, view.buf, IPC_HANDLE_SIZE);
    PyBuffer_Release(&view);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Module functions */

static PyObject *
m_available(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    if (ensure_loaded() < 0) {
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    return PyBool_FromLong(device_count > 0);
}

static PyObject *
m_load_error(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    if (ensure_loaded() < 0) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *text = value ? PyObject_Str(value) : NULL;
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return text;
    }
    if (device_count == 0) {
        return PyUnicode_FromString("CUDA is not available: the driver sees no CUDA device");
    }
    Py_RETURN_NONE;
}

static PyObject *
m_device_count(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    if (ensure_loaded() < 0) {
        return NULL;
    }
    return PyLong_FromLong(device_count);
}

static PyObject *
m_driver_version(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    if (ensure_loaded() < 0) {
        return NULL;
    }
    return PyLong_FromLong(driver_version);
}

static PyObject *
m_device_uuid(PyObject *Py_UNUSED(self), PyObject *arg)
{
    int dev;
    if (as_int(arg, "device ordinal", &dev) < 0 || ensure_loaded() < 0 || check_device(dev) < 0) {
        return NULL;
    }
    CUdevice d;
    CUuuid u;
    CUresult r;
    const char *call = "cuDeviceGet";
    Py_BEGIN_ALLOW_THREADS
    r = cu.DeviceGet(&d, dev);
    if (r == CUDA_SUCCESS) {
        call = "cuDeviceGetUuid";
        r = cu.DeviceGetUuid(&u, d);
    }
    Py_END_ALLOW_THREADS
    if (r != CUDA_SUCCESS) {
        char what[32];
        snprintf(what, sizeof what, "device %d", dev);
        return raise_cu(call, r, what);
    }
    /* nvidia-smi's spelling: GPU-8-4-4-4-12 lower-case hex digits. */
    const unsigned char *b = u.bytes;
    char text[48];
    snprintf(text, sizeof text,
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
             b[14], b[15]);
    return PyUnicode_FromString(text);
}

/* pointer_info(ptr) -> (device, base, size, buffer_id, legacy_ipc_capable or None) */
static PyObject *
m_pointer_info(PyObject *Py_UNUSED(self), PyObject *arg)
{
    unsigned long long ptr;
    if (as_u64(arg, "pointer", &ptr) < 0 || ensure_loaded() < 0) {
        return NULL;
    }
    unsigned long long ordinal = 0, buffer_id = 0, capable = 0;
    CUdeviceptr base = 0;
    size_t size = 0;
    CUresult r, rcap = CUDA_SUCCESS;
    const char *call = "cuPointerGetAttribute(DEVICE_ORDINAL)";
    ctx_guard g = {0};
    Py_BEGIN_ALLOW_THREADS
    /* Unified addressing: the ordinal can be asked without a current context. The other queries
     * run in that device's primary context. Zeroed 8-byte buffers take bool/int/u64 answers alike. */
    r = cu.PointerGetAttribute(&ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, (CUdeviceptr)ptr);
    if (r == CUDA_SUCCESS && (ordinal >= (unsigned long long)device_count || ordinal >= MAX_DEVICES)) {
        r = CUDA_ERROR_INVALID_VALUE;
    }
    if (r == CUDA_SUCCESS) {
        r = ctx_enter((int)ordinal, &g, &call);
    }
    if (r == CUDA_SUCCESS) {
        call = "cuMemGetAddressRange";
        r = cu.MemGetAddressRange(&base, &size, (CUdeviceptr)ptr);
    }
    if (r == CUDA_SUCCESS) {
        call = "cuPointerGetAttribute(BUFFER_ID)";
        r = cu.PointerGetAttribute(&buffer_id, CU_POINTER_ATTRIBUTE_BUFFER_ID, (CUdeviceptr)ptr);
    }
    if (r == CUDA_SUCCESS) {
        rcap = cu.PointerGetAttribute(&capable, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                                      (CUdeviceptr)ptr);
    }
    ctx_leave(&g);
    Py_END_ALLOW_THREADS
    if (r != CUDA_SUCCESS) {
        char what[48];
        snprintf(what, sizeof what, "0x%llx", ptr);
        return raise_cu(call, r, what);
    }
    PyObject *cap = rcap == CUDA_SUCCESS ? PyBool_FromLong(capable != 0) : Py_NewRef(Py_None);
    return Py_BuildValue("(iKnKN)", (int)ordinal, (unsigned long long)base, (Py_ssize_t)size, buffer_id, cap);
}

static const char NOT_EXPORTABLE[] =
    "is in GPU memory that cannot be shared through a CUDA IPC handle: it was allocated with the "
    "virtual memory management API (torch's expandable_segments) or from a stream-ordered memory "
    "pool (cudaMallocAsync). Start the producing process with "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False (and without backend:cudaMallocAsync), "
    "or copy the tensor into memory from the default allocator";

/* export(ptr, device=-1) -> (handle bytes[64], offset from allocation base, allocation size, device) */
static PyObject *
m_export(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"ptr", "device", NULL};
    PyObject *optr;
    int dev = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|i:export", kwlist, &optr, &dev)) {
        return NULL;
    }
    unsigned long long ptr;
    if (as_u64(optr, "pointer", &ptr) < 0) {
        return NULL;
    }
    if (ptr == 0) {
        PyErr_SetString(PyExc_ValueError, "cannot export the NULL device pointer (an empty tensor has none)");
        return NULL;
    }
    if (ensure_loaded() < 0) {
        return NULL;
    }
    if (dev >= 0 && check_device(dev) < 0) {
        return NULL;
    }
    unsigned long long ordinal = (unsigned long long)dev, capable = 1;
    CUdeviceptr base = 0;
    size_t size = 0;
    CUipcMemHandle h;
    CUresult r = CUDA_SUCCESS, rcap = CUDA_SUCCESS;
    const char *call = "cuPointerGetAttribute(DEVICE_ORDINAL)";
    ctx_guard g = {0};
    int not_capable = 0;
    Py_BEGIN_ALLOW_THREADS
    if (dev < 0) {
        ordinal = 0;
        r = cu.PointerGetAttribute(&ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, (CUdeviceptr)ptr);
        if (r == CUDA_SUCCESS && (ordinal >= (unsigned long long)device_count || ordinal >= MAX_DEVICES)) {
            r = CUDA_ERROR_INVALID_VALUE;
        }
    }
    if (r == CUDA_SUCCESS) {
        r = ctx_enter((int)ordinal, &g, &call);
    }
    if (r == CUDA_SUCCESS) {
        /* Drivers that predate the attribute answer with an error: then cuIpcGetMemHandle decides. */
        capable = 0;
        rcap = cu.PointerGetAttribute(&capable, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                                      (CUdeviceptr)ptr);
        not_capable = rcap == CUDA_SUCCESS && capable == 0;
    }
    if (r == CUDA_SUCCESS && !not_capable) {
        call = "cuMemGetAddressRange";
        r = cu.MemGetAddressRange(&base, &size, (CUdeviceptr)ptr);
    }
    if (r == CUDA_SUCCESS && !not_capable) {
        call = "cuIpcGetMemHandle";
        r = cu.IpcGetMemHandle(&h, base);
    }
    ctx_leave(&g);
    Py_END_ALLOW_THREADS
    char what[96];
    if (not_capable) {
        /* PyUnicode_FromFormat has no %llx: format the pointer ourselves. */
        snprintf(what, sizeof what, "0x%llx", ptr);
        PyObject *msg = PyUnicode_FromFormat("device pointer %s %s", what, NOT_EXPORTABLE);
        if (msg != NULL) {
            make_error(CudaError, "cuIpcGetMemHandle", CUDA_ERROR_NOT_SUPPORTED,
                       err_name(CUDA_ERROR_NOT_SUPPORTED), msg);
            Py_DECREF(msg);
        }
        return NULL;
    }
    if (r != CUDA_SUCCESS) {
        if (base != 0) {
            snprintf(what, sizeof what, "base 0x%llx of pointer 0x%llx, %zu bytes",
                     (unsigned long long)base, ptr, size);
        }
        else {
            snprintf(what, sizeof what, "0x%llx", ptr);
        }
        if (strcmp(call, "cuIpcGetMemHandle") == 0 && (r == CUDA_ERROR_INVALID_VALUE || r == CUDA_ERROR_NOT_SUPPORTED)) {
            PyObject *msg = PyUnicode_FromFormat("cuIpcGetMemHandle(%s) failed: %s (%s); the pointer %s",
                                                 what, err_name(r), err_string(r), NOT_EXPORTABLE);
            if (msg != NULL) {
                make_error(CudaError, call, r, err_name(r), msg);
                Py_DECREF(msg);
            }
            return NULL;
        }
        return raise_cu(call, r, what);
    }
    return Py_BuildValue("(y#KKi)", h.reserved, (Py_ssize_t)IPC_HANDLE_SIZE,
                         (unsigned long long)(ptr - base), (unsigned long long)size, (int)ordinal);
}

/* open(handle, device) -> (base pointer, allocation size; 0 when the driver cannot say) */
static PyObject *
m_open(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *ohandle;
    int dev;
    if (!PyArg_ParseTuple(args, "Oi:open", &ohandle, &dev)) {
        return NULL;
    }
    CUipcMemHandle h;
    if (as_handle(ohandle, &h) < 0 || ensure_loaded() < 0 || check_device(dev) < 0) {
        return NULL;
    }
    CUdeviceptr ptr = 0, base = 0;
    size_t size = 0;
    CUresult r;
    const char *call = "";
    ctx_guard g = {0};
    Py_BEGIN_ALLOW_THREADS
    r = ctx_enter(dev, &g, &call);
    if (r == CUDA_SUCCESS) {
        call = "cuIpcOpenMemHandle";
        r = cu.IpcOpenMemHandle(&ptr, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
    }
    if (r == CUDA_SUCCESS && cu.MemGetAddressRange(&base, &size, ptr) != CUDA_SUCCESS) {
        size = 0; /* the caller then relies on the sender's figure (or refuses) */
    }
    ctx_leave(&g);
    Py_END_ALLOW_THREADS
    if (r != CUDA_SUCCESS) {
        const unsigned char *b = (const unsigned char *)h.reserved;
        char what[96];
        snprintf(what, sizeof what, "handle %02x%02x%02x%02x%02x%02x%02x%02x..., device %d",
                 b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], dev);
        return raise_cu(call, r, what);
    }
    return Py_BuildValue("(Kn)", (unsigned long long)ptr, (Py_ssize_t)size);
}

/* close(base, device): waits for the device's work, then unmaps what open() mapped. */
static PyObject *
m_close(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *optr;
    int dev;
    if (!PyArg_ParseTuple(args, "Oi:close", &optr, &dev)) {
        return NULL;
    }
    unsigned long long ptr;
    if (as_u64(optr, "pointer", &ptr) < 0 || ensure_loaded() < 0 || check_device(dev) < 0) {
        return NULL;
    }
    CUresult r;
    const char *call = "";
    ctx_guard g = {0};
    Py_BEGIN_ALLOW_THREADS
    r = ctx_enter(dev, &g, &call);
    if (r == CUDA_SUCCESS) {
        /* Kernels queued on any stream may still read the mapping; unmapping under them is UB. A
         * failure here (a sticky error) must not keep the mapping alive, so close regardless. */
        (void)cu.CtxSynchronize();
        call = "cuIpcCloseMemHandle";
        r = cu.IpcCloseMemHandle((CUdeviceptr)ptr);
    }
    ctx_leave(&g);
    Py_END_ALLOW_THREADS
    if (r != CUDA_SUCCESS) {
        char what[48];
        snprintf(what, sizeof what, "0x%llx", ptr);
        return raise_cu(call, r, what);
    }
    Py_RETURN_NONE;
}

/* host_register(address, nbytes, read_only=False, device=0) -> True, or False if already registered */
static PyObject *
m_host_register(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"address", "nbytes", "read_only", "device", NULL};
    PyObject *oaddr, *onbytes;
    int read_only = 0, dev = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|pi:host_register", kwlist, &oaddr, &onbytes,
                                     &read_only, &dev)) {
        return NULL;
    }
    unsigned long long addr, nbytes;
    if (as_u64(oaddr, "address", &addr) < 0 || as_u64(onbytes, "nbytes", &nbytes) < 0) {
        return NULL;
    }
    if (addr == 0 || nbytes == 0) {
        PyErr_SetString(PyExc_ValueError, "host_register needs a non-NULL address and at least one byte");
        return NULL;
    }
    if (ensure_loaded() < 0 || check_device(dev) < 0) {
        return NULL;
    }
    unsigned int flags = CU_MEMHOSTREGISTER_PORTABLE | (read_only ? CU_MEMHOSTREGISTER_READ_ONLY : 0u);
    CUresult r;
    const char *call = "";
    ctx_guard g = {0};
    Py_BEGIN_ALLOW_THREADS
    r = ctx_enter(dev, &g, &call);
    if (r == CUDA_SUCCESS) {
        call = "cuMemHostRegister";
        r = cu.MemHostRegister((void *)(uintptr_t)addr, (size_t)nbytes, flags);
    }
    ctx_leave(&g);
    Py_END_ALLOW_THREADS
    if (r == CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED) {
        Py_RETURN_FALSE;
    }
    if (r != CUDA_SUCCESS) {
        char what[96];
        snprintf(what, sizeof what, "0x%llx, %llu bytes%s", addr, nbytes, read_only ? ", read-only" : "");
        return raise_cu(call, r, what);
    }
    Py_RETURN_TRUE;
}

/* host_unregister(address) -> True, or False if it was not registered */
static PyObject *
m_host_unregister(PyObject *Py_UNUSED(self), PyObject *arg)
{
    unsigned long long addr;
    if (as_u64(arg, "address", &addr) < 0 || ensure_loaded() < 0) {
        return NULL;
    }
    CUresult r;
    const char *call = "";
    ctx_guard g = {0};
    Py_BEGIN_ALLOW_THREADS
    r = ctx_enter(0, &g, &call);
    if (r == CUDA_SUCCESS) {
        call = "cuMemHostUnregister";
        r = cu.MemHostUnregister((void *)(uintptr_t)addr);
    }
    ctx_leave(&g);
    Py_END_ALLOW_THREADS
    if (r == CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED) {
        Py_RETURN_FALSE;
    }
    if (r != CUDA_SUCCESS) {
        char what[48];
        snprintf(what, sizeof what, "0x%llx", addr);
        return raise_cu(call, r, what);
    }
    Py_RETURN_TRUE;
}

/* mem_get_info(device) -> (free bytes, total bytes), from the driver */
static PyObject *
m_mem_get_info(PyObject *Py_UNUSED(self), PyObject *arg)
{
    int dev;
    if (as_int(arg, "device ordinal", &dev) < 0 || ensure_loaded() < 0 || check_device(dev) < 0) {
        return NULL;
    }
    size_t free_b = 0, total_b = 0;
    CUresult r;
    const char *call = "";
    ctx_guard g = {0};
    Py_BEGIN_ALLOW_THREADS
    r = ctx_enter(dev, &g, &call);
    if (r == CUDA_SUCCESS) {
        call = "cuMemGetInfo";
        r = cu.MemGetInfo(&free_b, &total_b);
    }
    ctx_leave(&g);
    Py_END_ALLOW_THREADS
    if (r != CUDA_SUCCESS) {
        char what[32];
        snprintf(what, sizeof what, "device %d", dev);
        return raise_cu(call, r, what);
    }
    return Py_BuildValue("(nn)", (Py_ssize_t)free_b, (Py_ssize_t)total_b);
}

/* ---------------------------------------------------------------------------------------------
 * DLPack (legacy "dltensor" capsule, the form every torch since 1.x consumes). Layouts from
 * dlpack.h v0.8; only the fields below exist in it. */

typedef struct {
    int32_t device_type;
    int32_t device_id;
} DLDevice;
typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DLDataType;
typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides;
    uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

enum { DL_CPU = 1, DL_CUDA = 2 };

typedef struct {
    DLManagedTensor managed; /* first: the consumer hands this pointer back to the deleter */
    PyObject *owner;         /* called with no arguments, then released, when the consumer is done */
    int64_t dims[];          /* shape[ndim] then strides[ndim] */
} Holder;

static int
interpreter_finalizing(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
}

/* Called by the consumer (torch frees the tensor's storage) from any thread, GIL or not. */
static void
holder_deleter(DLManagedTensor *m)
{
    Holder *h = (Holder *)m;
    if (h->owner != NULL && Py_IsInitialized() && !interpreter_finalizing()) {
        PyGILState_STATE st = PyGILState_Ensure();
        if (PyCallable_Check(h->owner)) {
            PyObject *res = PyObject_CallNoArgs(h->owner);
            if (res == NULL) {
                PyErr_WriteUnraisable(h->owner);
            }
            Py_XDECREF(res);
        }
        Py_DECREF(h->owner);
        PyGILState_Release(st);
    }
    PyMem_RawFree(h);
}

static void
capsule_destructor(PyObject *cap)
{
    /* Consumed capsules are renamed "used_dltensor" and belong to the consumer. */
    if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *m = PyCapsule_GetPointer(cap, "dltensor");
        if (m != NULL && m->deleter != NULL) {
            m->deleter(m);
        }
    }
}

static int
int64_tuple(PyObject *seq, const char *what, int64_t *out, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_GetItem(seq, i);
        if (item == NULL) {
            return -1;
        }
        long long v = PyLong_AsLongLong(item);
        Py_DECREF(item);
        if (v == -1 && PyErr_Occurred()) {
            PyErr_Format(PyExc_TypeError, "%s[%zd] must be an int64", what, i);
            return -1;
        }
        out[i] = (int64_t)v;
    }
    return 0;
}

/* dlpack(ptr, device, type_code, bits, shape, strides, owner, device_type=kDLCUDA) -> PyCapsule
 * "dltensor". shape and strides count elements; owner() is called once the consumer frees the
 * tensor. device_type kDLCPU (1) lets tests check the layout with host memory. */
static PyObject *
m_dlpack(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"ptr", "device", "type_code", "bits", "shape", "strides", "owner",
                             "device_type", NULL};
    PyObject *optr, *shape, *strides, *owner;
    int dev, code, bits, device_type = DL_CUDA;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiiiOOO|i:dlpack", kwlist, &optr, &dev, &code, &bits,
                                     &shape, &strides, &owner, &device_type)) {
        return NULL;
    }
    if (device_type != DL_CUDA && device_type != DL_CPU) {
        PyErr_Format(PyExc_ValueError, "device_type must be %d (CUDA) or %d (CPU)", DL_CUDA, DL_CPU);
        return NULL;
    }
    unsigned long long ptr;
    if (as_u64(optr, "pointer", &ptr) < 0) {
        return NULL;
    }
    if (!PySequence_Check(shape) || !PySequence_Check(strides)) {
        PyErr_SetString(PyExc_TypeError, "shape and strides must be sequences of ints");
        return NULL;
    }
    Py_ssize_t ndim = PySequence_Size(shape);
    if (ndim < 0 || PySequence_Size(strides) != ndim || ndim > 64) {
        PyErr_SetString(PyExc_ValueError, "shape and strides must have the same length (at most 64)");
        return NULL;
    }
    if (dev < 0 || code < 0 || code > 255 || bits <= 0 || bits > 255) {
        PyErr_SetString(PyExc_ValueError, "bad device or dtype for a DLPack tensor");
        return NULL;
    }
    Holder *h = PyMem_RawCalloc(1, sizeof(Holder) + 2 * (size_t)(ndim ? ndim : 1) * sizeof(int64_t));
    if (h == NULL) {
        return PyErr_NoMemory();
    }
    if (int64_tuple(shape, "shape", h->dims, ndim) < 0 ||
        int64_tuple(strides, "strides", h->dims + ndim, ndim) < 0) {
        PyMem_RawFree(h);
        return NULL;
    }
    DLTensor *t = &h->managed.dl_tensor;
    t->data = (void *)(uintptr_t)ptr;
    t->device.device_type = device_type;
    t->device.device_id = dev;
    t->ndim = (int32_t)ndim;
    t->dtype.code = (uint8_t)code;
    t->dtype.bits = (uint8_t)bits;
    t->dtype.lanes = 1;
    t->shape = h->dims;
    t->strides = h->dims + ndim;
    t->byte_offset = 0;
    h->managed.manager_ctx = h;
    h->managed.deleter = holder_deleter;
    h->owner = Py_NewRef(owner);
    PyObject *cap = PyCapsule_New(&h->managed, "dltensor", capsule_destructor);
    if (cap == NULL) {
        /* No capsule, no consumer: the caller still owns what `owner` stands for, so don't call it. */
        Py_DECREF(h->owner);
        PyMem_RawFree(h);
        return NULL;
    }
    return cap;
}

static PyMethodDef methods[] = {
    {"available", m_available, METH_NOARGS,
     "available($module, /)\n--\n\navailable() -> bool\n\nTrue when the CUDA driver loads and sees at least one device. The first "
     "call loads libcuda.so.1 and runs cuInit: after it, this process must not fork CUDA users."},
    {"load_error", m_load_error, METH_NOARGS,
     "load_error($module, /)\n--\n\nload_error() -> str | None\n\nWhy CUDA is unusable here (None when it is usable)."},
    {"device_count", m_device_count, METH_NOARGS, "device_count($module, /)\n--\n\ndevice_count() -> int"},
    {"driver_version", m_driver_version, METH_NOARGS, "driver_version($module, /)\n--\n\ndriver_version() -> int (e.g. 13000)"},
    {"device_uuid", m_device_uuid, METH_O,
     "device_uuid($module, ordinal, /)\n--\n\ndevice_uuid(ordinal) -> str\n\nThe device's uuid as nvidia-smi writes it: GPU-xxxxxxxx-xxxx-..."},
    {"pointer_info", m_pointer_info, METH_O,
     "pointer_info($module, ptr, /)\n--\n\npointer_info(ptr) -> (device, base, size, buffer_id, legacy_ipc_capable | None)"},
    {"export", (PyCFunction)(void (*)(void))m_export, METH_VARARGS | METH_KEYWORDS,
     "export($module, ptr, device=-1)\n--\n\nexport(ptr, device=-1) -> (handle: bytes[64], offset: int, alloc_nbytes: int, device: int)\n\n"
     "The IPC handle of the allocation holding ptr and ptr's offset from its base."},
    {"open", m_open, METH_VARARGS,
     "open($module, handle, device, /)\n--\n\nopen(handle, device) -> (base: int, alloc_nbytes: int)\n\nMaps an IPC handle in the device's "
     "primary context (peer access enabled lazily). Pair every open with one close."},
    {"close", m_close, METH_VARARGS,
     "close($module, base, device, /)\n--\n\nclose(base, device)\n\nWaits for the device's queued work, then unmaps what open() returned."},
    {"host_register", (PyCFunction)(void (*)(void))m_host_register, METH_VARARGS | METH_KEYWORDS,
     "host_register($module, address, nbytes, read_only=False, device=0)\n--\n\nhost_register(address, nbytes, read_only=False, device=0) -> bool\n\nPage-locks host memory "
     "for every context (portable). False when it was already registered."},
    {"host_unregister", m_host_unregister, METH_O,
     "host_unregister($module, address, /)\n--\n\nhost_unregister(address) -> bool\n\nFalse when the address was not registered."},
    {"mem_get_info", m_mem_get_info, METH_O, "mem_get_info($module, device, /)\n--\n\nmem_get_info(device) -> (free, total) bytes"},
    {"dlpack", (PyCFunction)(void (*)(void))m_dlpack, METH_VARARGS | METH_KEYWORDS,
     "dlpack($module, ptr, device, type_code, bits, shape, strides, owner, device_type=2)\n--\n\ndlpack(ptr, device, type_code, bits, shape, strides, owner, device_type=2) -> PyCapsule\n\nA "
     "DLPack 'dltensor' capsule over CUDA memory (device_type 2; 1 = host memory, for tests), shape "
     "and strides in elements; owner() is called once when the consumer frees the tensor (or the "
     "capsule dies unconsumed)."},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *m)
{
    CudaError = PyErr_NewExceptionWithDoc(
        "sidecar._cudaipc.CudaError",
        "A CUDA driver call failed. Attributes: call (the driver function), code (the CUresult, "
        "-1 when the driver is unavailable) and name (e.g. CUDA_ERROR_INVALID_VALUE).",
        PyExc_RuntimeError, NULL);
    if (CudaError == NULL || PyModule_AddObjectRef(m, "CudaError", CudaError) < 0) {
        return -1;
    }
    CudaUnavailableError = PyErr_NewExceptionWithDoc(
        "sidecar._cudaipc.CudaUnavailableError",
        "The CUDA driver cannot be used in this process (not installed, no device, or forked).",
        CudaError, NULL);
    if (CudaUnavailableError == NULL ||
        PyModule_AddObjectRef(m, "CudaUnavailableError", CudaUnavailableError) < 0) {
        return -1;
    }
    if (PyModule_AddIntConstant(m, "HANDLE_SIZE", IPC_HANDLE_SIZE) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sidecar._cudaipc",
    .m_doc = "CUDA IPC handles through the CUDA driver API, loaded at run time (see native/cuda_ipc.c).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__cudaipc(void)
{
    return PyModuleDef_Init(&moduledef);
}
