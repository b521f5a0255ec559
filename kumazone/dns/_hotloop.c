/*
 * The batched UDP port's inner loop, in C (kumazone.dns.udpbatch).
 *
 * At 50,000 queries a second the Python loop over a batch of datagrams cost
 * more than everything else the server does for a known answer: 1.57 x NSD's
 * CPU per answer where issue 10 asks for 1.2 x (1.22 x with this module).
 * This module does the part of that loop that runs for every datagram of a
 * hot client -- find the client's mesh by its address, find the answer kept
 * for the query's exact octets, count it, copy it into the send buffer with
 * the query's ID, RD and CD bits; or make the NXDOMAIN for a name in the
 * domain that no one has -- and leaves every other datagram to the Python
 * code, which is the reference: the loop of
 * udpbatch.BatchedDNSPort._answer_batch gives the same octets.  Tests:
 * tests/unit/test_hotloop.py (this module against the Python rules, on plain
 * buffers) and tests/process/test_udp_batch.py (both loops on real sockets,
 * against Twisted's own UDP port).
 *
 * answer_known(count, headers, data, names, iovecs, out, clients,
 *              ip_start, ip_stop, slot, name_slot, negative) -> list of indices
 *
 * headers: the receive side's struct mmsghdr[count] (msg_len is read);
 * data, names: the datagrams, each in a slot of C{slot} octets, and their
 * source addresses, each in a slot of C{name_slot} octets (the client's IP
 * address at [ip_start, ip_stop) of it); iovecs, out: the send side's struct
 * iovec[count] (iov_len is written) and data slots; clients: the hot cache's
 * dict of packed IP address -> (mesh, positive, negative), each of the two a
 * dict of {query octets after ID and flags: (answer, [counter])}; negative:
 * None, or what an NXDOMAIN for a name no one has is made of (see
 * negative_answer): a query with no kept answer is then answered here when
 * it is one, as hotpath.HotCache.negative would answer it.
 *
 * The result lists, in order, the datagrams this loop did not answer (no
 * client entry yet, no kept answer, flags or length the Python code must
 * judge, or an object of a type it does not expect): the caller answers those
 * one by one and sends the rest.  On an error of Python's own (no memory) it
 * raises, having answered nothing it can be held to: the caller answers the
 * whole batch in Python (serve, below, has read the batch by then: it is lost).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: it defines _GNU_SOURCE (recvmmsg, sendmmsg) */

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* The number 1, made once (counters are Python ints). */
static PyObject *one;

/* Most datagrams a call takes, and the largest slot: bounds that keep the
 * buffer checks' products far from overflowing. */
#define MAX_COUNT 1024
#define MAX_SLOT 65536

/* counter[0] += 1 for a counter that is a list whose first item is an exact int
 * (no Python code runs, so borrowed references stay valid): 1; 0 for any other
 * counter (the Python loop counts it); -1 on an error. */
static int
count_one(PyObject *counter)
{
    if (!PyList_CheckExact(counter) || PyList_GET_SIZE(counter) < 1
        || !PyLong_CheckExact(PyList_GET_ITEM(counter, 0))) {
        return 0;
    }
    PyObject *one_more = PyNumber_Add(PyList_GET_ITEM(counter, 0), one);
    if (one_more == NULL) {
        return -1;
    }
    PyList_SetItem(counter, 0, one_more); /* steals one_more, drops the old count */
    return 1;
}

/* Releases the buffers a call holds. */
static void
release(Py_buffer *views, int held)
{
    for (int i = 0; i < held; i++) {
        PyBuffer_Release(&views[i]);
    }
}

/* Takes the buffers of objects[0, count), writable from index writable on;
 * on failure releases those taken and returns -1. */
static int
take_buffers(PyObject *const *objects, int count, int writable, Py_buffer *views)
{
    for (int i = 0; i < count; i++) {
        if (PyObject_GetBuffer(objects[i], &views[i], i >= writable ? PyBUF_WRITABLE
                                                                    : PyBUF_SIMPLE) < 0) {
            release(views, i);
            return -1;
        }
    }
    return 0;
}

/* What both calls end with: clients, ip_start, ip_stop, slot, name_slot, negative. */
typedef struct {
    PyObject *clients;
    Py_ssize_t ip_start, ip_stop, slot, name_slot;
    PyObject *negative; /* NULL for None: no NXDOMAIN answers are made */
} loop_args;

static int negative_context_ok(PyObject *context);

/* Reads and checks those arguments (sizes: ip_start, ip_stop, slot, name_slot);
 * -1 with an exception set (named after who). */
static int
parse_loop_args(PyObject *clients, PyObject *const *sizes, PyObject *negative, const char *who,
                loop_args *parsed)
{
    parsed->clients = clients;
    parsed->ip_start = PyLong_AsSsize_t(sizes[0]);
    parsed->ip_stop = PyLong_AsSsize_t(sizes[1]);
    parsed->slot = PyLong_AsSsize_t(sizes[2]);
    parsed->name_slot = PyLong_AsSsize_t(sizes[3]);
    if (PyErr_Occurred()) {
        return -1;
    }
    parsed->negative = negative == Py_None ? NULL : negative;
    if (parsed->negative != NULL && !negative_context_ok(parsed->negative)) {
        PyErr_Format(PyExc_TypeError, "%s: a negative context of another shape", who);
        return -1;
    }
    if (!PyDict_Check(parsed->clients)) {
        PyErr_Format(PyExc_TypeError, "%s: clients must be a dict", who);
        return -1;
    }
    if (parsed->slot < 16 || parsed->slot > MAX_SLOT || parsed->name_slot < 1
        || parsed->name_slot > MAX_SLOT || parsed->ip_start < 0
        || parsed->ip_stop <= parsed->ip_start || parsed->ip_stop > parsed->name_slot) {
        PyErr_Format(PyExc_ValueError, "%s: bad slot or address range", who);
        return -1;
    }
    return 0;
}

/* Most options walked in a query's OPT record (hotpath.MAX_EDNS_OPTIONS). */
#define MAX_EDNS_OPTIONS 32

/* hotpath._edns_state: 1 (DO clear) or 2 (DO set) for the OPT record at
 * start, or 0 where it does not qualify. */
static int
edns_state(const unsigned char *data, Py_ssize_t start, Py_ssize_t size)
{
    if (size < start + 11 || data[start] != 0 || data[start + 1] != 0 || data[start + 2] != 41
        || data[start + 6] != 0) {
        return 0;
    }
    int do_bit = data[start + 7] & 0x80;
    Py_ssize_t rdlength = (data[start + 9] << 8) | data[start + 10];
    Py_ssize_t options = start + 11;
    if (options + rdlength != size) {
        return 0;
    }
    int count = 0;
    while (options < size) {
        count++;
        if (options + 4 > size || count > MAX_EDNS_OPTIONS) {
            return 0;
        }
        options += 4 + ((data[options + 2] << 8) | data[options + 3]);
    }
    if (options != size) {
        return 0;
    }
    return do_bit ? 2 : 1;
}

/* Whether the dotted name [name, name + length) ends with one of the bytes in
 * the tuple suffixes, or is one of the bytes in the tuple names. */
static int
odd_name(const char *name, Py_ssize_t length, PyObject *names, PyObject *suffixes)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++) {
        PyObject *odd = PyTuple_GET_ITEM(names, i);
        if (PyBytes_GET_SIZE(odd) == length && memcmp(PyBytes_AS_STRING(odd), name, length) == 0) {
            return 1;
        }
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(suffixes); i++) {
        PyObject *odd = PyTuple_GET_ITEM(suffixes, i);
        Py_ssize_t n = PyBytes_GET_SIZE(odd);
        if (n <= length && memcmp(PyBytes_AS_STRING(odd), name + length - n, n) == 0) {
            return 1;
        }
    }
    return 0;
}

/* The negative context's parts (hotpath.HotCache.negative_context, from the hot
 * cache and its authority): see negative_answer. */
enum {
    NX_FORWARD,  /* dict: mesh -> {dotted name (str): served} */
    NX_EMPTY,    /* dict: dotted name (str) -> meshes */
    NX_APEX,     /* bytes: the domain, as b"mesh" */
    NX_SUFFIX,   /* bytes: b".mesh" */
    NX_ODD,      /* tuple of bytes: names the SOA's names compress into */
    NX_ODD_SUFFIXES, /* tuple of bytes: b"." + each of those */
    NX_TAILS,    /* dict: (rcode, apex, name length, EDNS state) -> (header, rest, counters) */
    NX_RCODE,    /* int: NXDOMAIN, as the tails' keys have it */
    NX_PARTS,
};

/* Checks that a negative context has the parts and types negative_answer reads. */
static int
negative_context_ok(PyObject *context)
{
    if (!PyTuple_CheckExact(context) || PyTuple_GET_SIZE(context) != NX_PARTS) {
        return 0;
    }
    PyObject *odd = PyTuple_GET_ITEM(context, NX_ODD);
    PyObject *suffixes = PyTuple_GET_ITEM(context, NX_ODD_SUFFIXES);
    if (!PyDict_CheckExact(PyTuple_GET_ITEM(context, NX_FORWARD))
        || !PyDict_CheckExact(PyTuple_GET_ITEM(context, NX_EMPTY))
        || !PyBytes_CheckExact(PyTuple_GET_ITEM(context, NX_APEX))
        || !PyBytes_CheckExact(PyTuple_GET_ITEM(context, NX_SUFFIX))
        || !PyTuple_CheckExact(odd) || !PyTuple_CheckExact(suffixes)
        || !PyDict_CheckExact(PyTuple_GET_ITEM(context, NX_TAILS))
        || !PyLong_CheckExact(PyTuple_GET_ITEM(context, NX_RCODE))) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(odd); i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(odd, i))) {
            return 0;
        }
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(suffixes); i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(suffixes, i))) {
            return 0;
        }
    }
    return 1;
}

/*
 * The NXDOMAIN for a query of a name in the domain that no one has, made as
 * hotpath.HotCache.negative makes it, into answer (room for slot octets):
 * the query's ID, RD, CD and question, then the tail learnt for answers of
 * its kind.  Returns the answer's size; 0 where this case is not one it makes
 * (the name parses otherwise than hot_key would take it, is the apex, the
 * nameserver's or near them, is a service's or an empty non-terminal, the
 * class is not IN or the type a transfer, or no tail or counter is learnt
 * yet): the Python loop then judges it.  -1 on an error of Python's own.
 */
static Py_ssize_t
negative_answer(const unsigned char *query, Py_ssize_t size, PyObject *mesh, PyObject *context,
                unsigned char *answer, Py_ssize_t slot)
{
    static const unsigned char plain[8] = {0, 1, 0, 0, 0, 0, 0, 0};
    static const unsigned char edns[8] = {0, 1, 0, 0, 0, 0, 0, 1};
    if (size < 17 || (query[2] & 0xFE)) {
        return 0;
    }
    int has_edns;
    if (memcmp(query + 4, plain, 8) == 0) {
        has_edns = 0;
    } else if (memcmp(query + 4, edns, 8) == 0) {
        has_edns = 1;
    } else {
        return 0;
    }
    /* hot_key's walk: the name uncompressed, labels of 1 to 63 octets with no
     * '.' in them, 255 octets at most; the dotted form lower-cased. */
    char dotted[256];
    Py_ssize_t dotted_length = 0;
    Py_ssize_t position = 12, total = 1;
    for (;;) {
        if (position >= size) {
            return 0;
        }
        Py_ssize_t length = query[position];
        if (length == 0) {
            break;
        }
        if (length > 63 || position + 1 + length > size) {
            return 0;
        }
        total += length + 1;
        if (total > 255) {
            return 0;
        }
        if (dotted_length) {
            dotted[dotted_length++] = '.';
        }
        for (Py_ssize_t i = 0; i < length; i++) {
            unsigned char c = query[position + 1 + i];
            if (c == '.') {
                return 0;
            }
            dotted[dotted_length++] = (char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
        }
        position += 1 + length;
    }
    Py_ssize_t end = position + 1;
    Py_ssize_t question_end = end + 4;
    int state = 0;
    if (has_edns) {
        state = edns_state(query, question_end, size);
        if (state == 0) {
            return 0;
        }
    } else if (question_end != size) {
        return 0;
    }
    int qtype = (query[end] << 8) | query[end + 1];
    int qclass = (query[end + 2] << 8) | query[end + 3];
    if (qclass != 1 || qtype == 251 || qtype == 252) {
        return 0;
    }
    PyObject *suffix = PyTuple_GET_ITEM(context, NX_SUFFIX);
    Py_ssize_t suffix_length = PyBytes_GET_SIZE(suffix);
    if (dotted_length <= suffix_length
        || memcmp(dotted + dotted_length - suffix_length, PyBytes_AS_STRING(suffix),
                  suffix_length) != 0
        || odd_name(dotted, dotted_length, PyTuple_GET_ITEM(context, NX_ODD),
                    PyTuple_GET_ITEM(context, NX_ODD_SUFFIXES))) {
        return 0;
    }
    /* MeshAuthority._forward_kind: a service's name in this mesh, or an empty
     * non-terminal, is the Python loop's to answer. */
    PyObject *text = PyUnicode_DecodeLatin1(dotted, dotted_length, NULL);
    if (text == NULL) {
        return -1;
    }
    PyObject *in_mesh = PyDict_GetItemWithError(PyTuple_GET_ITEM(context, NX_FORWARD), mesh);
    PyObject *found = NULL;
    if (in_mesh != NULL) {
        found = PyDict_CheckExact(in_mesh) ? PyDict_GetItemWithError(in_mesh, text) : Py_None;
    }
    if (found == NULL && !PyErr_Occurred()) {
        found = PyDict_GetItemWithError(PyTuple_GET_ITEM(context, NX_EMPTY), text);
    }
    Py_DECREF(text);
    if (found != NULL || PyErr_Occurred()) {
        return PyErr_Occurred() ? -1 : 0;
    }
    /* HotCache.negative: the tail of (NXDOMAIN, apex, name length, EDNS state). */
    PyObject *key = Py_BuildValue("(OOnn)", PyTuple_GET_ITEM(context, NX_RCODE),
                                  PyTuple_GET_ITEM(context, NX_APEX), end - 12, (Py_ssize_t)state);
    if (key == NULL) {
        return -1;
    }
    PyObject *tail = PyDict_GetItemWithError(PyTuple_GET_ITEM(context, NX_TAILS), key);
    Py_DECREF(key);
    if (tail == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    if (!PyTuple_CheckExact(tail) || PyTuple_GET_SIZE(tail) != 3) {
        return 0;
    }
    PyObject *header = PyTuple_GET_ITEM(tail, 0);
    PyObject *rest = PyTuple_GET_ITEM(tail, 1);
    PyObject *counters = PyTuple_GET_ITEM(tail, 2);
    if (!PyBytes_CheckExact(header) || PyBytes_GET_SIZE(header) != 10 || !PyBytes_CheckExact(rest)
        || !PyDict_CheckExact(counters)) {
        return 0;
    }
    Py_ssize_t answer_size = 12 + (question_end - 12) + PyBytes_GET_SIZE(rest);
    if (answer_size > slot) {
        return 0;
    }
    PyObject *type_class = PyBytes_FromStringAndSize((const char *)query + end, 4);
    if (type_class == NULL) {
        return -1;
    }
    PyObject *counter = PyDict_GetItemWithError(counters, type_class);
    Py_DECREF(type_class);
    if (counter == NULL) {
        return PyErr_Occurred() ? -1 : 0; /* the Python loop makes the counter */
    }
    int counted = count_one(counter);
    if (counted <= 0) {
        return counted;
    }
    const unsigned char *kept = (const unsigned char *)PyBytes_AS_STRING(header);
    answer[0] = query[0];
    answer[1] = query[1];
    answer[2] = kept[0] | (query[2] & 0x01);
    answer[3] = kept[1] | (query[3] & 0x10);
    memcpy(answer + 4, kept + 2, 8);
    memcpy(answer + 12, query + 12, (size_t)(question_end - 12));
    memcpy(answer + question_end, PyBytes_AS_STRING(rest), (size_t)PyBytes_GET_SIZE(rest));
    return answer_size;
}

/* answer_known's loop over buffers already checked: the rest, or NULL on an error. */
static PyObject *
answer_core(Py_ssize_t count, const struct mmsghdr *headers, const unsigned char *data,
            const unsigned char *names, struct iovec *iovecs, unsigned char *out,
            const loop_args *loop)
{
    PyObject *clients = loop->clients, *negative = loop->negative;
    Py_ssize_t ip_start = loop->ip_start, ip_stop = loop->ip_stop;
    Py_ssize_t slot = loop->slot, name_slot = loop->name_slot;
    PyObject *rest = PyList_New(0);
    if (rest == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *query = data + i * slot;
        Py_ssize_t length = (Py_ssize_t)headers[i].msg_len;
        PyObject *seen = NULL;
        PyObject *mesh = NULL; /* of a client seen before, when the query may be negative */
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
                if (seen == NULL && PyUnicode_CheckExact(PyTuple_GET_ITEM(client, 0))) {
                    mesh = PyTuple_GET_ITEM(client, 0);
                }
            }
        }
        if (mesh != NULL && negative != NULL) {
            Py_ssize_t made = negative_answer(query, length, mesh, negative, out + i * slot, slot);
            if (made < 0) {
                goto failed;
            }
            if (made > 0) {
                iovecs[i].iov_len = (size_t)made;
                continue;
            }
        }
        PyObject *template = NULL, *counter = NULL;
        if (seen != NULL && PyTuple_CheckExact(seen) && PyTuple_GET_SIZE(seen) == 2) {
            template = PyTuple_GET_ITEM(seen, 0);
            counter = PyTuple_GET_ITEM(seen, 1);
        }
        int counted = 0;
        if (template != NULL && PyBytes_CheckExact(template) && PyBytes_GET_SIZE(template) >= 4
            && PyBytes_GET_SIZE(template) <= slot) {
            counted = count_one(counter);
            if (counted < 0) {
                goto failed;
            }
        }
        if (!counted) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(rest, index) < 0) {
                Py_XDECREF(index);
                goto failed;
            }
            Py_DECREF(index);
            continue;
        }
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
    return rest;

failed:
    Py_DECREF(rest);
    return NULL;
}

static PyObject *
answer_known(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 12) {
        PyErr_Format(PyExc_TypeError, "answer_known takes 12 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t count = PyLong_AsSsize_t(args[0]);
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    loop_args loop;
    if (parse_loop_args(args[6], args + 7, args[11], "answer_known", &loop) < 0) {
        return NULL;
    }
    if (count < 0 || count > MAX_COUNT) {
        PyErr_SetString(PyExc_ValueError, "answer_known: a count below zero or past 1024");
        return NULL;
    }
    Py_ssize_t slot = loop.slot, name_slot = loop.name_slot;
    /* headers, data, names are read; iovecs and out are written. */
    Py_buffer views[5];
    int held = 5;
    if (take_buffers(args + 1, 5, 3, views) < 0) {
        return NULL;
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

    PyObject *rest = answer_core(count, headers, data, names, iovecs, out, &loop);
    release(views, held);
    return rest;
}

/*
 * serve((fd, batch, received, answers, data, names, iovecs, out,
 *        ip_start, ip_stop, slot, name_slot), clients, negative)
 *     -> (count, rest, errno, failed)
 *
 * (What stays the same for a port comes as one tuple, made once.)
 *
 * One batch of the port's doRead in one call: recvmmsg(2) of up to batch
 * datagrams into the received headers (struct mmsghdr[batch], whose data and
 * address slots are data and names), answer_known over them, and, when it
 * answered them all, sendmmsg(2) of the answers (the answers' headers point
 * into out and names).  count is recvmmsg's result (-1 with errno set);
 * rest the datagrams left to the Python loop, in which case nothing was sent
 * (the Python loop sends in runs around them); failed the answers sendmmsg
 * refused (each skipped, as udpbatch's _send does).
 */
static PyObject *
serve(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "serve takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyTuple_CheckExact(args[0]) || PyTuple_GET_SIZE(args[0]) != 12) {
        PyErr_SetString(PyExc_TypeError, "serve: the port's arguments must be a tuple of 12");
        return NULL;
    }
    PyObject *const *fixed = &PyTuple_GET_ITEM(args[0], 0);
    long fd = PyLong_AsLong(fixed[0]);
    Py_ssize_t batch = PyLong_AsSsize_t(fixed[1]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    loop_args loop;
    if (parse_loop_args(args[1], fixed + 8, args[2], "serve", &loop) < 0) {
        return NULL;
    }
    if (fd < 0 || fd > INT_MAX || batch < 1 || batch > MAX_COUNT) {
        PyErr_SetString(PyExc_ValueError, "serve: bad fd or batch");
        return NULL;
    }
    Py_ssize_t slot = loop.slot, name_slot = loop.name_slot;
    /* received, answers, data, names, iovecs, out: all written (by the kernel or here). */
    Py_buffer views[6];
    int held = 6;
    if (take_buffers(fixed + 2, 6, 0, views) < 0) {
        return NULL;
    }
    if (views[0].len < batch * (Py_ssize_t)sizeof(struct mmsghdr)
        || views[1].len < batch * (Py_ssize_t)sizeof(struct mmsghdr)
        || views[2].len < batch * slot || views[3].len < batch * name_slot
        || views[4].len < batch * (Py_ssize_t)sizeof(struct iovec)
        || views[5].len < batch * slot) {
        release(views, held);
        PyErr_SetString(PyExc_ValueError, "serve: a buffer is shorter than batch slots");
        return NULL;
    }
    struct mmsghdr *received = views[0].buf;
    struct mmsghdr *answers = views[1].buf;
    int count = recvmmsg((int)fd, received, (unsigned int)batch, MSG_DONTWAIT, NULL);
    if (count <= 0) {
        int number = count < 0 ? errno : 0;
        release(views, held);
        return Py_BuildValue("(iOii)", count, Py_None, number, 0);
    }
    PyObject *rest = answer_core(count, received, views[2].buf, views[3].buf, views[4].buf,
                                 views[5].buf, &loop);
    if (rest == NULL) {
        release(views, held);
        return NULL;
    }
    int failed = 0;
    if (PyList_GET_SIZE(rest) == 0) {
        int start = 0;
        while (start < count) {
            int sent = sendmmsg((int)fd, answers + start, (unsigned int)(count - start), 0);
            if (sent > 0) {
                start += sent;
            } else if (sent < 0 && errno == EINTR) {
                continue;
            } else {
                /* A full send buffer or a refused destination: that client retries. */
                failed++;
                start++;
            }
        }
    }
    release(views, held);
    PyObject *result = Py_BuildValue("(iOii)", count, rest, 0, failed);
    Py_DECREF(rest);
    return result;
}

static PyMethodDef methods[] = {
    {"answer_known", (PyCFunction)(void (*)(void))answer_known, METH_FASTCALL,
     "Answer the datagrams of a batch that have a kept answer; the indices of the rest."},
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL,
     "Read one batch, answer what answer_known answers, and send it when that is all of it."},
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
