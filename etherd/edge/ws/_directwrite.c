/* The fan-out's per-subscriber loop in C: one send(2) per WebSocket subscriber.
 *
 * The hub hands each segment's bytes to every direct subscriber (see etherd/core/hub.py).
 * In Python that costs the interpreter loop, three attribute reads and the transport's
 * write (which checks its state, appends to its buffer list and pops it again) for every
 * subscriber of every tick: about half a microsecond, next to about four for the system
 * call itself. Here the loop reads the same attributes with the C API and, when the
 * transport holds nothing unsent, writes straight to the socket.
 *
 * Ordering: bytes may skip the transport only while it holds nothing unsent. The loop
 * asks the transport (``unsent()``) and keeps a yes in ``drained_fd`` until something is
 * written through the transport again (the session's own writes reset it; so does this
 * loop when the socket does not take a whole write). Otherwise, and for whatever a short
 * write leaves, the bytes go through ``send`` (the transport's write), which queues them
 * behind what it holds, watches the socket for writability and reports errors (EPIPE,
 * ECONNRESET) the way it always does. The descriptor is the session's own duplicate
 * (``fd``), so its number cannot be taken by a new connection while a flush runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <sys/socket.h>
#include <sys/types.h>

static PyObject *s_direct;
static PyObject *s_pending;
static PyObject *s_fd;
static PyObject *s_drained_fd;
static PyObject *s_unsent;
static PyObject *s_send;

/* An int attribute of the sink, or -1 when it has none (an SSE stream, a test's sink). */
static int int_attr(PyObject *sink, PyObject *name, long *out)
{
    PyObject *obj = PyObject_GetAttr(sink, name);
    if (obj == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        *out = -1;
        return 0;
    }
    *out = PyLong_AsLong(obj);
    Py_DECREF(obj);
    if (*out == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

static int set_int_attr(PyObject *sink, PyObject *name, long value)
{
    PyObject *obj = PyLong_FromLong(value);
    if (obj == NULL)
        return -1;
    int rc = PyObject_SetAttr(sink, name, obj);
    Py_DECREF(obj);
    return rc;
}

/* The descriptor to write to past the transport, or -1. ``drained_fd`` says the transport
 * was seen empty and nothing was written through it since; failing that, the transport is
 * asked (once: the answer is kept in ``drained_fd`` until the next write through it). */
static int writable_fd(PyObject *sink, long *fd)
{
    if (int_attr(sink, s_drained_fd, fd) < 0)
        return -1;
    if (*fd >= 0)
        return 0;
    long own;
    if (int_attr(sink, s_fd, &own) < 0)
        return -1;
    if (own < 0)
        return 0;
    PyObject *size = PyObject_CallMethodNoArgs(sink, s_unsent);
    if (size == NULL)
        return -1;
    int busy = PyObject_IsTrue(size);
    Py_DECREF(size);
    if (busy < 0)
        return -1;
    if (busy)
        return 0;
    if (set_int_attr(sink, s_drained_fd, own) < 0)
        return -1;
    *fd = own;
    return 0;
}

/* One subscriber's copy of the segment; 0, or -1 with a Python error set. */
static int write_one(PyObject *sink, PyObject *data, const char *buf, Py_ssize_t len)
{
    long fd;
    Py_ssize_t done = 0;
    if (writable_fd(sink, &fd) < 0)
        return -1;
    if (fd >= 0) {
        ssize_t n;
        do {
            n = send((int)fd, buf, (size_t)len, MSG_NOSIGNAL | MSG_DONTWAIT);
        } while (n < 0 && errno == EINTR);
        if (n == len)
            return 0;
        if (n > 0)
            done = n;
        /* EAGAIN, an error, or a short write: the transport takes it from here, and
         * everything after it goes through the transport until it is empty again. */
        if (set_int_attr(sink, s_drained_fd, -1) < 0)
            return -1;
    }
    PyObject *rest;
    if (done == 0) {
        Py_INCREF(data);
        rest = data;
    } else {
        /* A view, not a copy: the segment's bytes are shared by all its subscribers, and a
         * slow one would otherwise hold a copy of its own (as the transport does itself). */
        PyObject *view = PyMemoryView_FromObject(data);
        if (view == NULL)
            return -1;
        rest = PySequence_GetSlice(view, done, len);
        Py_DECREF(view);
        if (rest == NULL)
            return -1;
    }
    PyObject *res = PyObject_CallMethodOneArg(sink, s_send, rest);
    Py_DECREF(rest);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

PyDoc_STRVAR(send_all_doc,
             "send_all(sinks, data, slow, /) -> int\n"
             "--\n\n"
             "Write data to every sink that is direct and has nothing pending; append the\n"
             "others to slow. Returns how many sinks were written to.");

static PyObject *send_all(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "send_all() takes sinks, data and slow");
        return NULL;
    }
    PyObject *data = args[1];
    PyObject *slow = args[2];
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "send_all() data must be bytes");
        return NULL;
    }
    if (!PyList_Check(slow)) {
        PyErr_SetString(PyExc_TypeError, "send_all() slow must be a list");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "send_all() sinks must be iterable");
    if (seq == NULL)
        return NULL;
    const char *buf = PyBytes_AS_STRING(data);
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t sent = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *sink = items[i];
        /* A write below may close a later sink of this segment; it must not free it. */
        Py_INCREF(sink);
        PyObject *direct = PyObject_GetAttr(sink, s_direct);
        if (direct == NULL)
            goto fail;
        int is_direct = PyObject_IsTrue(direct);
        Py_DECREF(direct);
        if (is_direct < 0)
            goto fail;
        if (is_direct) {
            PyObject *pending = PyObject_GetAttr(sink, s_pending);
            if (pending == NULL)
                goto fail;
            int waiting = PyList_CheckExact(pending) ? PyList_GET_SIZE(pending) > 0
                                                      : PyObject_IsTrue(pending);
            Py_DECREF(pending);
            if (waiting < 0)
                goto fail;
            if (!waiting) {
                if (write_one(sink, data, buf, len) < 0)
                    goto fail;
                sent++;
                Py_DECREF(sink);
                continue;
            }
        }
        if (PyList_Append(slow, sink) < 0)
            goto fail;
        Py_DECREF(sink);
        continue;
    fail:
        Py_DECREF(sink);
        Py_DECREF(seq);
        return NULL;
    }
    Py_DECREF(seq);
    return PyLong_FromSsize_t(sent);
}

static PyMethodDef methods[] = {
    {"send_all", (PyCFunction)(void (*)(void))send_all, METH_FASTCALL, send_all_doc},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module)
{
    (void)module;
    if (s_direct != NULL)
        return 0; /* a second import (another interpreter) shares the names */
    s_direct = PyUnicode_InternFromString("direct");
    s_pending = PyUnicode_InternFromString("pending");
    s_fd = PyUnicode_InternFromString("fd");
    s_drained_fd = PyUnicode_InternFromString("drained_fd");
    s_unsent = PyUnicode_InternFromString("unsent");
    s_send = PyUnicode_InternFromString("send");
    if (!s_direct || !s_pending || !s_fd || !s_drained_fd || !s_unsent || !s_send)
        return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "etherd.edge.ws._directwrite",
    .m_doc = "The fan-out's per-subscriber write loop (see the C source's comment).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__directwrite(void)
{
    return PyModuleDef_Init(&moduledef);
}
