/* Python stack capture (vfio_emu.stack.capture_stack) in C: the module vfio_emu._stackwalk.
 *
 * Every kzalloc, kfree, get_device and open keeps the stack of the code that called into
 * the emulator, so a later KASAN report can print it: a capture runs several times per
 * life-cycle transition.  Written in Python, the walk was a fifth of a probe-to-release
 * cycle; here it is the same walk over the same public frame API, without the bytecode.
 *
 * A StackCapture holds what the walk needs from vfio_emu.stack: the Stack class it makes,
 * the table of code objects known to be the emulator's own (id(code) -> (bool, code)) and
 * the function that classifies a code object seen for the first time.  Its bound method
 * capture(limit=16, internal=False) is vfio_emu.stack.capture_stack.
 *
 * build_ffi.py builds this file as the module vfio_emu._stackwalk (after cffi's Python.h).
 */

#include <frameobject.h>

typedef struct {
    PyObject_HEAD
    PyObject *stack_type; /* vfio_emu.stack.Stack: its _data slot gets the raw list */
    PyObject *known;      /* dict: id(code) -> (internal: bool, code) */
    PyObject *classify;   /* classify(frame) -> bool, which also fills known */
    PyObject *data_name;  /* "_data", interned */
} StackCapture;

static PyObject *capture_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *stack_type, *known, *classify;
    if (!PyArg_ParseTuple(args, "O!O!O:StackCapture", &PyType_Type, &stack_type, &PyDict_Type,
                          &known, &classify))
        return NULL;
    if (!PyCallable_Check(classify)) {
        PyErr_SetString(PyExc_TypeError, "StackCapture(Stack, known: dict, classify)");
        return NULL;
    }
    StackCapture *self = (StackCapture *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    self->data_name = PyUnicode_InternFromString("_data");
    if (!self->data_name) {
        Py_DECREF(self);
        return NULL;
    }
    Py_INCREF(stack_type);
    self->stack_type = stack_type;
    Py_INCREF(known);
    self->known = known;
    Py_INCREF(classify);
    self->classify = classify;
    return (PyObject *)self;
}

static int capture_traverse(StackCapture *self, visitproc visit, void *arg)
{
    Py_VISIT(self->stack_type);
    Py_VISIT(self->known);
    Py_VISIT(self->classify);
    Py_VISIT((PyObject *)Py_TYPE(self));
    return 0;
}

static int capture_clear(StackCapture *self)
{
    Py_CLEAR(self->stack_type);
    Py_CLEAR(self->known);
    Py_CLEAR(self->classify);
    Py_CLEAR(self->data_name);
    return 0;
}

static void capture_dealloc(StackCapture *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    capture_clear(self);
    type->tp_free(self);
    Py_DECREF(type);
}

/* The instruction offset in bytes, as frame.f_lasti gives it. */
static long frame_lasti(PyFrameObject *f)
{
#if PY_VERSION_HEX >= 0x030B00B1
    return PyFrame_GetLasti(f);
#else
    return f->f_lasti < 0 ? f->f_lasti : f->f_lasti * (long)sizeof(_Py_CODEUNIT);
#endif
}

/* Whether f runs the emulator's own code: 1, 0, or -1 with an exception set. */
static int is_internal(StackCapture *self, PyFrameObject *f)
{
    PyCodeObject *code = PyFrame_GetCode(f);
    PyObject *key = PyLong_FromVoidPtr(code);
    Py_DECREF(code);
    if (!key)
        return -1;
    PyObject *hit = PyDict_GetItemWithError(self->known, key); /* borrowed */
    Py_DECREF(key);
    if (hit) {
        if (!PyTuple_Check(hit) || PyTuple_GET_SIZE(hit) < 1) {
            PyErr_SetString(PyExc_TypeError, "StackCapture: known[id(code)] must be (bool, code)");
            return -1;
        }
        return PyObject_IsTrue(PyTuple_GET_ITEM(hit, 0));
    }
    if (PyErr_Occurred())
        return -1;
    PyObject *res = PyObject_CallOneArg(self->classify, (PyObject *)f);
    if (!res)
        return -1;
    int internal = PyObject_IsTrue(res);
    Py_DECREF(res);
    return internal;
}

static PyObject *capture_capture(StackCapture *self, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    static const char *names[] = {"limit", "internal"};
    PyObject *given[2] = {NULL, NULL};
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "capture_stack() takes at most 2 arguments");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        given[i] = args[i];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        int slot = -1;
        for (int j = 0; j < 2; j++)
            if (PyUnicode_CompareWithASCIIString(name, names[j]) == 0)
                slot = j;
        if (slot < 0 || given[slot]) {
            PyErr_Format(PyExc_TypeError, slot < 0
                         ? "capture_stack() got an unexpected keyword argument %R"
                         : "capture_stack() got multiple values for argument %R", name);
            return NULL;
        }
        given[slot] = args[nargs + i];
    }
    long limit = 16;
    if (given[0]) {
        int overflow;
        limit = PyLong_AsLongAndOverflow(given[0], &overflow);
        if (limit == -1 && PyErr_Occurred())
            return NULL;
        if (overflow) /* as in Python: a huge limit is the whole stack, a tiny one none */
            limit = overflow > 0 ? LONG_MAX : 0;
    }
    if (!self->known) {
        PyErr_SetString(PyExc_RuntimeError, "capture_stack: its StackCapture was cleared");
        return NULL;
    }
    int internal = 0;
    if (given[1]) {
        internal = PyObject_IsTrue(given[1]);
        if (internal < 0)
            return NULL;
    }

    PyObject *raw = PyList_New(0);
    if (!raw)
        return NULL;
    /* The caller's frame: a C function has none of its own (sys._getframe(1) in Python). */
    PyFrameObject *f = PyEval_GetFrame();
    Py_XINCREF(f);
    if (!internal) {
        while (f) {
            int inner = is_internal(self, f);
            if (inner < 0)
                goto error;
            if (!inner)
                break;
            PyFrameObject *back = PyFrame_GetBack(f);
            Py_DECREF(f);
            f = back;
        }
    }
    while (f && limit > 0) {
        PyObject *code = (PyObject *)PyFrame_GetCode(f);
        PyObject *lasti = PyLong_FromLong(frame_lasti(f));
        int failed = !lasti || PyList_Append(raw, code) < 0 || PyList_Append(raw, lasti) < 0;
        Py_DECREF(code);
        Py_XDECREF(lasti);
        if (failed)
            goto error;
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
        limit--;
    }
    Py_XDECREF(f);
    PyTypeObject *type = (PyTypeObject *)self->stack_type;
    PyObject *stack = type->tp_alloc(type, 0);
    if (!stack || PyObject_SetAttr(stack, self->data_name, raw) < 0) {
        Py_XDECREF(stack);
        Py_DECREF(raw);
        return NULL;
    }
    Py_DECREF(raw);
    return stack;

error:
    Py_XDECREF(f);
    Py_DECREF(raw);
    return NULL;
}

static PyMethodDef capture_methods[] = {
    {"capture", (PyCFunction)(void (*)(void))capture_capture, METH_FASTCALL | METH_KEYWORDS,
     "capture($self, /, limit=16, internal=False)\n--\n\n"
     "The caller's Stack (outermost frame first): vfio_emu.stack.capture_stack."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot capture_slots[] = {
    {Py_tp_new, (void *)capture_new},
    {Py_tp_dealloc, (void *)capture_dealloc},
    {Py_tp_traverse, (void *)capture_traverse},
    {Py_tp_clear, (void *)capture_clear},
    {Py_tp_methods, capture_methods},
    {Py_tp_doc, (void *)"vfio_emu.stack.capture_stack's walk, in C."},
    {0, NULL},
};

static PyType_Spec capture_spec = {
    "vfio_emu._stackwalk.StackCapture", sizeof(StackCapture), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, capture_slots,
};

/* The type, made once; its address, for vfio_emu.stack to turn into the object (0 if it
 * could not be made).  cffi calls this with the GIL released: it takes it back. */
static uintptr_t vfio_stackcapture_type(void)
{
    static PyObject *type;
    PyGILState_STATE gil = PyGILState_Ensure();
    if (!type) {
        type = PyType_FromSpec(&capture_spec);
        if (!type)
            PyErr_Clear();
    }
    PyGILState_Release(gil);
    return (uintptr_t)type;
}
