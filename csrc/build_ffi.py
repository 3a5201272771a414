"""The whole C boundary of vfio-emu: the cdef Python sees and the C it is built from.

setup.py only wires this file in through ``cffi_modules``; nothing else in the
project declares C.  Out-of-line API mode: the compiler checks every
declaration here against ``vfio_emu.h``.
"""

from __future__ import annotations

import os

from cffi import FFI

SOURCES = ["arena.c", "refcount.c", "completion.c", "warn.c"]

TYPES = """
#define VFIO_SLOT_SIZE 128
#define VFIO_LABEL_MAX 48
#define VFIO_WARN_STACK_MAX ...
#define VFIO_CAPACITY_MAX ...
#define VFIO_WARN_CAPACITY_MAX ...
#define VFIO_HZ_MAX ...
static const double VFIO_TIME_SCALE_MIN;
static const double VFIO_TIME_SCALE_MAX;
#define VFIO_WARN_SEQ_MAX ...
#define REFCOUNT_MAX ...
#define REFCOUNT_SATURATED ...
#define VFIO_RET_TRUE ...
#define VFIO_RET_WARN ...
#define VFIO_RET_SEQ_SHIFT ...

enum vfio_kind { VFIO_KIND_FREE, VFIO_KIND_REFCOUNT, VFIO_KIND_KREF, VFIO_KIND_COMPLETION, ... };
enum vfio_warn_kind {
    VFIO_WARN_ADD_NOT_ZERO_OVF, VFIO_WARN_ADD_OVF, VFIO_WARN_ADD_UAF, VFIO_WARN_SUB_UAF,
    VFIO_WARN_DEC_LEAK, VFIO_WARN_OTHER, ...
};
enum vfio_status {
    VFIO_OK, VFIO_E_STALE, VFIO_E_RANGE, VFIO_E_KIND, VFIO_E_FULL, VFIO_E_NOENT, VFIO_E_EXIST,
    VFIO_E_FOREIGN, VFIO_E_VERSION, VFIO_E_TRUNCATED, VFIO_E_CORRUPT, VFIO_E_SYS, VFIO_E_INVAL,
    VFIO_E_INTR, VFIO_E_TIMEDOUT, VFIO_E_OWNER, ...
};

typedef struct vfio_arena vfio_arena_t;
typedef struct { uint32_t index; uint32_t gen; ...; } vfio_handle_t;

typedef struct {
    uint32_t capacity; uint32_t warn_capacity; uint32_t hz;
    double time_scale; int64_t created_ns; uint32_t creator_pid;
    uint64_t incarnation; uint64_t creator_start; int closed; int lost; int owner;
    uint64_t warn_head; uint64_t warn_dropped; int64_t spin_ns;
} vfio_arena_info_t;

typedef struct {
    uint32_t gen; uint32_t kind; int32_t refs; uint32_t done; uint32_t waiters;
    uint32_t owner_pid; char label[];
    ...;
} vfio_slot_info_t;

typedef struct {
    uint64_t seq; int64_t time_ns; uint32_t kind; uint32_t pid; uint32_t tid;
    uint32_t obj_index; uint32_t obj_gen; uint32_t obj_kind; int32_t old; int32_t new;
    char text[]; char label[]; char stack[];
    ...;
} vfio_warn_entry_t;

"""

CORE = """
/* arena.c */
int vfio_arena_create(const char *name, uint32_t capacity, uint32_t warn_capacity,
                      uint32_t hz, double time_scale, vfio_arena_t **out, int *err);
int vfio_arena_attach(const char *name, vfio_arena_t **out, int *err);
int vfio_arena_close(vfio_arena_t *a, int unlink_it, int *err);
void vfio_arena_release(vfio_arena_t *a);
int vfio_shm_unlink(const char *name, int *err);
void vfio_arena_info(const vfio_arena_t *a, vfio_arena_info_t *out);
void vfio_arena_set_spin(vfio_arena_t *a, int64_t spin_ns);
uint32_t vfio_arena_in_use(const vfio_arena_t *a);
uint64_t vfio_proc_start_time(uint32_t pid);
int vfio_slot_alloc(vfio_arena_t *a, uint32_t kind, const char *label, vfio_handle_t *h);
int vfio_slot_free(vfio_handle_t *h);
int vfio_handle_open(vfio_arena_t *a, uint32_t index, uint32_t gen, uint32_t kind,
                     vfio_handle_t *h);
int vfio_slot_info(const vfio_arena_t *a, uint32_t index, vfio_slot_info_t *out);
int64_t vfio_slot_churn(vfio_arena_t *a, int64_t n);
int64_t vfio_noop(vfio_handle_t *h);
int64_t vfio_monotonic_ns(void);

/* refcount.c: batches (long loops: they let other threads run) */
int64_t vfio_refcount_inc_many(vfio_handle_t *h, int64_t n);
int64_t vfio_refcount_dec_and_test_many(vfio_handle_t *h, int64_t n);
int64_t vfio_kref_pairs(vfio_handle_t *h, int64_t n);
int64_t vfio_refcount_inc_array(vfio_handle_t *const *hs, int64_t n, int64_t *bad);
int64_t vfio_refcount_dec_and_test_array(vfio_handle_t *const *hs, int64_t n, uint8_t *hit,
                                         int64_t *bad);

/* completion.c: the only call that sleeps */
int64_t vfio_completion_wait(vfio_handle_t *h, int64_t deadline_ns, int64_t slice_ns, int spin,
                             uint32_t *consumed);

/* warn.c */
const char *vfio_warn_text(uint32_t kind);
int64_t vfio_warn_emit(vfio_arena_t *a, vfio_handle_t *h, uint32_t kind, const char *text);
int vfio_warn_read(const vfio_arena_t *a, uint64_t seq, vfio_warn_entry_t *out);
int vfio_warn_set_stack(vfio_arena_t *a, uint64_t first, const char *stack);
"""

FAST = """
int64_t vfio_noop_gil(vfio_handle_t *h);
/* pyref.c: the type whose bound methods are Kref.get and Kref.put */
uintptr_t vfio_refops_type(void);

/* refcount.c */
int64_t vfio_refcount_set(vfio_handle_t *h, int32_t n);
int64_t vfio_refcount_read(vfio_handle_t *h);
int64_t vfio_refcount_inc(vfio_handle_t *h);
int64_t vfio_refcount_add(vfio_handle_t *h, int32_t i);
int64_t vfio_refcount_inc_not_zero(vfio_handle_t *h);
int64_t vfio_refcount_add_not_zero(vfio_handle_t *h, int32_t i);
int64_t vfio_refcount_dec_and_test(vfio_handle_t *h);
int64_t vfio_refcount_sub_and_test(vfio_handle_t *h, int32_t i);
int64_t vfio_refcount_dec(vfio_handle_t *h);
int64_t vfio_refcount_dec_if_one(vfio_handle_t *h);
int64_t vfio_refcount_dec_not_one(vfio_handle_t *h);

/* completion.c: everything that never sleeps */
int64_t vfio_completion_reinit(vfio_handle_t *h);
int64_t vfio_completion_complete(vfio_handle_t *h);
int64_t vfio_completion_complete_all(vfio_handle_t *h);
int64_t vfio_completion_try_wait(vfio_handle_t *h);
int64_t vfio_completion_done(vfio_handle_t *h);
int64_t vfio_completion_read(vfio_handle_t *h);
int64_t vfio_completion_waiters(vfio_handle_t *h);
"""

# Everything _fast exposes is a few nanoseconds of lock-free work that never
# blocks (at most a FUTEX_WAKE), so it keeps the GIL: releasing and retaking
# it would cost ten times the work.  Anything that can sleep or loop long
# stays in _core, built the standard way.  If a cffi release stopped using
# these macros, the only effect would be slower calls.
KEEP_GIL = """
#undef Py_BEGIN_ALLOW_THREADS
#define Py_BEGIN_ALLOW_THREADS {
#undef Py_END_ALLOW_THREADS
#define Py_END_ALLOW_THREADS }
/* Nor do they need ffi.errno: skip cffi's errno save/restore around each call. */
#undef _cffi_restore_errno
#define _cffi_restore_errno() ((void)0)
#undef _cffi_save_errno
#define _cffi_save_errno() ((void)0)

/* The no-op again, GIL kept: shows what the crossing costs without the release. */
static int64_t vfio_noop_gil(vfio_handle_t *h) { (void)h; return 0; }

#include "pyref.c"
"""



#: VFIO_EMU_SANITIZE=address,undefined builds the C core under those sanitizers (make
#: sanitize): any report aborts, so a test run under it fails on the first one.
SANITIZE = os.environ.get("VFIO_EMU_SANITIZE", "")
SANITIZE_FLAGS = ([f"-fsanitize={SANITIZE}", "-fno-sanitize-recover=all",
                   "-fno-omit-frame-pointer", "-g"] if SANITIZE else [])
#: How every module is compiled.
CFLAGS = ["-std=gnu11", "-O2", "-fvisibility=hidden", "-Wall", "-Wextra",
          "-Wno-unused-parameter", "-Werror=implicit-function-declaration", *SANITIZE_FLAGS]


def _builder(module: str, functions: str, preamble: str = "",
             include: FFI | None = None, defines: tuple[str, ...] = ()) -> FFI:
    builder = FFI()
    if include is None:
        builder.cdef(TYPES)
    else:
        builder.include(include)  # share the types, so one handle serves both modules
    builder.cdef(functions)
    builder.set_source(
        module,
        '#include "vfio_emu.h"\n' + preamble,
        sources=[os.path.join("csrc", name) for name in SOURCES],
        include_dirs=["csrc"],
        depends=["csrc/vfio_emu.h", "csrc/build_ffi.py", "csrc/pyref.c"],
        extra_compile_args=[*defines, *CFLAGS],
        extra_link_args=SANITIZE_FLAGS,
        libraries=["rt"],
    )
    return builder


#: The standard cffi build: every call releases the GIL.
ffibuilder = _builder("vfio_emu.shm._core", CORE)
#: The hot path: refcount_t and non-sleeping completion calls, GIL kept.
#: Its RefOps type (pyref.c) uses the stable ABI of 3.10 (METH_FASTCALL), not cffi's 3.2.
fastbuilder = _builder("vfio_emu.shm._fast", FAST, KEEP_GIL, include=ffibuilder,
                       defines=("-DPy_LIMITED_API=0x030A0000",))

#: The foundation's one C type (csrc/pystack.c), the walk of vfio_emu.stack.capture_stack:
#: a module of its own, below the shared-memory layer, built for the running CPython (the
#: frame API it walks is not in the stable ABI).
stackbuilder = FFI()
stackbuilder.cdef("uintptr_t vfio_stackcapture_type(void);")
stackbuilder.set_source(
    "vfio_emu._stackwalk", '#include "pystack.c"',
    include_dirs=["csrc"], depends=["csrc/build_ffi.py", "csrc/pystack.c"],
    extra_compile_args=CFLAGS,
    extra_link_args=SANITIZE_FLAGS,
    py_limited_api=False,
    define_macros=[("_CFFI_NO_LIMITED_API", None)],  # what py_limited_api=False sets in cffi
)                                                    # 1.17+; older ones need it said
