/* Kref.get()/put() as methods of a small Python type, built into the _fast module only.
 *
 * A cffi function cannot be bound to its argument: Kref.get() was a Python frame around
 * the call.  A RefOps object holds the handle, and its bound methods are what a Kref's
 * get and put are, so kref_get() is one C method call and one C function.  Anything but a
 * plain success goes back to Python (the Kref's own slow path).  Stable ABI 3.10.
 *
 * build_ffi.py includes this file into _fast's source, after Python.h and vfio_emu.h.
 */

typedef struct {
    PyObject_HEAD
    vfio_handle_t *h;
    PyObject *keep;     /* the handle's cdata: h lives as long as it does */
    PyObject *slow;     /* kref._slow(status, op) */
    PyObject *put_slow; /* kref._put_slow(status, release, op) */
} RefOps;

static PyObject *refops_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    unsigned long long addr;
    PyObject *keep, *slow, *put_slow;
    if (!PyArg_ParseTuple(args, "KOOO:RefOps", &addr, &keep, &slow, &put_slow))
        return NULL;
    if (!addr || !PyCallable_Check(slow) || !PyCallable_Check(put_slow)) {
        PyErr_SetString(PyExc_TypeError, "RefOps(handle address, handle, slow, put_slow)");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    RefOps *self = (RefOps *)alloc(type, 0);
    if (!self)
        return NULL;
    self->h = (vfio_handle_t *)(uintptr_t)addr;
    Py_INCREF(keep);
    self->keep = keep;
    Py_INCREF(slow);
    self->slow = slow;
    Py_INCREF(put_slow);
    self->put_slow = put_slow;
    return (PyObject *)self;
}

static int refops_traverse(RefOps *self, visitproc visit, void *arg)
{
    Py_VISIT(self->keep);
    Py_VISIT(self->slow);
    Py_VISIT(self->put_slow);
    Py_VISIT((PyObject *)Py_TYPE(self));
    return 0;
}

static int refops_clear(RefOps *self)
{
    Py_CLEAR(self->keep);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->put_slow);
    return 0;
}

static void refops_dealloc(RefOps *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    refops_clear(self);
    freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
    tp_free(self);
    Py_DECREF(type);
}

static PyObject *refops_get(RefOps *self, PyObject *unused)
{
    int64_t r = vfio_refcount_inc(self->h);
    if (r == 0)
        Py_RETURN_NONE;
    PyObject *res = PyObject_CallFunction(self->slow, "Ls", (long long)r, "kref_get");
    if (!res)
        return NULL;
    Py_DECREF(res);
    Py_RETURN_NONE;
}

static PyObject *refops_put(RefOps *self, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames)
{
    PyObject *release = Py_None;
    Py_ssize_t nkw = kwnames ? PyTuple_Size(kwnames) : 0;
    if (nargs + nkw > 1) {
        PyErr_SetString(PyExc_TypeError, "put() takes at most one argument (release)");
        return NULL;
    }
    if (nargs == 1) {
        release = args[0];
    } else if (nkw == 1) {
        PyObject *name = PyTuple_GetItem(kwnames, 0);
        if (!name || PyUnicode_CompareWithASCIIString(name, "release") != 0) {
            PyErr_Format(PyExc_TypeError, "put() got an unexpected keyword argument %R", name);
            return NULL;
        }
        release = args[0];
    }
    int64_t r = vfio_refcount_dec_and_test(self->h);
    if (r == 0)
        return PyLong_FromLong(0);
    return PyObject_CallFunction(self->put_slow, "LOs", (long long)r, release, "kref_put");
}

static PyMethodDef refops_methods[] = {
    {"get", (PyCFunction)(void (*)(void))refops_get, METH_NOARGS, "kref_get()."},
    {"put", (PyCFunction)(void (*)(void))refops_put, METH_FASTCALL | METH_KEYWORDS,
     "kref_put(): 1 if this dropped the last reference and ran release, else 0."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot refops_slots[] = {
    {Py_tp_new, (void *)refops_new},
    {Py_tp_dealloc, (void *)refops_dealloc},
    {Py_tp_traverse, (void *)refops_traverse},
    {Py_tp_clear, (void *)refops_clear},
    {Py_tp_methods, refops_methods},
    {Py_tp_doc, (void *)"The C half of a Kref: its get and put, bound to its handle."},
    {0, NULL},
};

static PyType_Spec refops_spec = {
    "vfio_emu.shm._fast.RefOps", sizeof(RefOps), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, refops_slots,
};

/* The type, made once; its address, for _binding to turn into the object. */
static uintptr_t vfio_refops_type(void)
{
    static PyObject *type;
    if (!type)
        type = PyType_FromSpec(&refops_spec);
    return (uintptr_t)type;
}
