/*
 * The batched UDP port's inner loop, in C (kumazone.dns.udpbatch).
 *
 * At 50,000 queries a second the Python loop over a batch of datagrams cost
 * more than everything else the server does for a known answer: 1.57 x NSD's
 * CPU per answer where the issue asks for 1.2 x.  This module does the part of
 * that loop that runs for every datagram of a hot client -- find the client's
 * mesh by its address, find the answer kept for the query's exact octets,
 * count it, copy it into the send buffer with the query's ID, RD and CD bits
 * -- and leaves every other datagram to the Python code, which is the
 * reference: L{udpbatch.BatchedDNSPort._answer_one} gives the same octets
 * (tests/unit/test_udpbatch.py compares the two on the same buffers).
 *
 * answer_known(count, headers, data, names, iovecs, out, clients,
 *              ip_start, ip_stop, slot, name_slot) -> list of indices
 *
 * headers: the receive side's struct mmsghdr[count] (msg_len is read);
 * data, names: the datagrams, each in a slot of C{slot} octets, and their
 * source addresses, each in a slot of C{name_slot} octets (the client's IP
 * address at [ip_start, ip_stop) of it); iovecs, out: the send side's struct
 * iovec[count] (iov_len is written) and data slots; clients: the hot cache's
 * dict of packed IP address -> (mesh, positive, negative), each of the two a
 * dict of {query octets after ID and flags: (answer, [counter])}.
 *
 * The result lists, in order, the datagrams this loop did not answer (no
 * client entry yet, no kept answer, flags or length the Python code must
 * judge, or an object of a type it does not expect): the caller answers those
 * one by one and sends the rest.  On an error of Python's own (no memory) it
 * raises, having answered nothing it can be held to: the caller answers the
 * whole batch in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* The number 1, made once (counters are Python ints). */
static PyObject *one;

/* Releases the buffers a call holds. */
static void
release(Py_buffer *views, int held)
{
    for (int i = 0; i < held; i++) {
        PyBuffer_Release(&views[i]);
    }
}

static PyObject *
answer_known(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 11) {
        PyErr_Format(PyExc_TypeError, "answer_known takes 11 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t count = PyLong_AsSsize_t(args[0]);
    Py_ssize_t ip_start = PyLong_AsSsize_t(args[7]);
    Py_ssize_t ip_stop = PyLong_AsSsize_t(args[8]);
    Py_ssize_t slot = PyLong_AsSsize_t(args[9]);
    Py_ssize_t name_slot = PyLong_AsSsize_t(args[10]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *clients = args[6];
    if (!PyDict_Check(clients)) {
        PyErr_SetString(PyExc_TypeError, "answer_known: clients must be a dict");
        return NULL;
    }
    if (count < 0 || slot < 16 || name_slot < 1 || ip_start < 0 || ip_stop <= ip_start
        || ip_stop > name_slot) {
        PyErr_SetString(PyExc_ValueError, "answer_known: bad count, slot or address range");
        return NULL;
    }
    /* headers, data, names are read; iovecs and out are written. */
    Py_buffer views[5];
    int held = 0;
    for (int i = 0; i < 5; i++) {
        int flags = (i >= 3) ? PyBUF_WRITABLE : PyBUF_SIMPLE;
        if (PyObject_GetBuffer(args[1 + i], &views[i], flags) < 0) {
            release(views, held);
            return NULL;
        }
        held++;
    }
    if (views[0].len < count * (Py_ssize_t)sizeof(struct mmsghdr)
        || views[1].len < count * slot || views[2].len < count * name_slot
        || views[3].len < count * (Py_ssize_t)sizeof(struct iovec)
        || views[4].len < count * slot) {
        release(views, held);
        PyErr_SetString(PyExc_ValueError, "answer_known: a buffer is shorter than count slots");
        return NULL;
    }
    const struct mmsghdr *headers = views[0].buf;
    const unsigned char *data = views[1].buf;
    const unsigned char *names = views[2].buf;
    struct iovec *iovecs = views[3].buf;
    unsigned char *out = views[4].buf;

    PyObject *rest = PyList_New(0);
    if (rest == NULL) {
        release(views, held);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *query = data + i * slot;
        Py_ssize_t length = (Py_ssize_t)headers[i].msg_len;
        PyObject *seen = NULL;
        /* As the Python loop: only queries past the header, QR, opcode, AA and
         * TC clear (RD may be either), of a client seen before. */
        if (length > 12 && length <= slot && !(query[2] & 0xFE)) {
            PyObject *ip = PyBytes_FromStringAndSize(
                (const char *)names + i * name_slot + ip_start, ip_stop - ip_start);
            if (ip == NULL) {
                goto failed;
            }
            PyObject *client = PyDict_GetItemWithError(clients, ip); /* borrowed */
            Py_DECREF(ip);
            if (client == NULL && PyErr_Occurred()) {
                goto failed;
            }
            if (client != NULL && PyTuple_CheckExact(client) && PyTuple_GET_SIZE(client) == 3
                && PyDict_CheckExact(PyTuple_GET_ITEM(client, 1))
                && PyDict_CheckExact(PyTuple_GET_ITEM(client, 2))) {
                PyObject *key = PyBytes_FromStringAndSize((const char *)query + 4, length - 4);
                if (key == NULL) {
                    goto failed;
                }
                /* The positive answers, then the negative ones (hotpath.Client). */
                seen = PyDict_GetItemWithError(PyTuple_GET_ITEM(client, 1), key);
                if (seen == NULL && !PyErr_Occurred()) {
                    seen = PyDict_GetItemWithError(PyTuple_GET_ITEM(client, 2), key);
                }
                Py_DECREF(key);
                if (seen == NULL && PyErr_Occurred()) {
                    goto failed;
                }
            }
        }
        PyObject *template = NULL, *counter = NULL;
        if (seen != NULL && PyTuple_CheckExact(seen) && PyTuple_GET_SIZE(seen) == 2) {
            template = PyTuple_GET_ITEM(seen, 0);
            counter = PyTuple_GET_ITEM(seen, 1);
        }
        if (template == NULL || !PyBytes_CheckExact(template) || PyBytes_GET_SIZE(template) < 4
            || PyBytes_GET_SIZE(template) > slot || !PyList_CheckExact(counter)
            || PyList_GET_SIZE(counter) < 1) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(rest, index) < 0) {
                Py_XDECREF(index);
                goto failed;
            }
            Py_DECREF(index);
            continue;
        }
        /* counter[0] += 1 */
        PyObject *one_more = PyNumber_Add(PyList_GET_ITEM(counter, 0), one);
        if (one_more == NULL) {
            goto failed;
        }
        PyList_SetItem(counter, 0, one_more); /* steals one_more, drops the old count */
        /* hotpath.answer_from's patch: the query's ID, its RD and CD bits. */
        const unsigned char *kept = (const unsigned char *)PyBytes_AS_STRING(template);
        Py_ssize_t size = PyBytes_GET_SIZE(template);
        unsigned char *answer = out + i * slot;
        memcpy(answer, kept, (size_t)size);
        answer[0] = query[0];
        answer[1] = query[1];
        answer[2] = kept[2] | (query[2] & 0x01);
        answer[3] = kept[3] | (query[3] & 0x10);
        iovecs[i].iov_len = (size_t)size;
    }
    release(views, held);
    return rest;

failed:
    Py_DECREF(rest);
    release(views, held);
    return NULL;
}

static PyMethodDef methods[] = {
    {"answer_known", (PyCFunction)(void (*)(void))answer_known, METH_FASTCALL,
     "Answer the datagrams of a batch that have a kept answer; the indices of the rest."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef hotloop = {
    PyModuleDef_HEAD_INIT,
    "kumazone.dns._hotloop",
    "The batched UDP port's inner loop for known answers (see udpbatch).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__hotloop(void)
{
    if (one == NULL && (one = PyLong_FromLong(1)) == NULL) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&hotloop);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "MMSGHDR_SIZE", (long)sizeof(struct mmsghdr)) < 0
        || PyModule_AddIntConstant(module, "IOVEC_SIZE", (long)sizeof(struct iovec)) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
