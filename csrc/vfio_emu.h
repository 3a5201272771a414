/* SPDX-License-Identifier: MIT
 *
 * vfio_emu.h - the C core of vfio-emu.
 *
 * Everything that lives in shared memory and every atomic on it is defined
 * here and implemented in the .c files beside it; Python reaches it only
 * through the cffi module built by build_ffi.py.  Layout changes must bump
 * VFIO_ARENA_VERSION.
 */
#ifndef VFIO_EMU_H
#define VFIO_EMU_H

#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>

#define VFIO_ARENA_MAGIC	0x554d4520f10e4d55ULL
#define VFIO_ARENA_VERSION	2u
#define VFIO_SLOT_SIZE		128u	/* one object per 128-byte block: no false sharing */
#define VFIO_HDR_SIZE		4096u
#define VFIO_WARN_REC_SIZE	2048u
#define VFIO_LABEL_MAX		48u
#define VFIO_WARN_TEXT_MAX	128u
#define VFIO_WARN_REC_HDR	56u	/* the fixed fields before text[] */
#define VFIO_WARN_STACK_MAX	(VFIO_WARN_REC_SIZE - VFIO_WARN_REC_HDR - VFIO_WARN_TEXT_MAX - VFIO_LABEL_MAX)
#define VFIO_NAME_MAX		255u	/* shm_open name, leading '/' included */
#define VFIO_CAPACITY_MAX	(1u << 22)
#define VFIO_WARN_CAPACITY_MAX	(1u << 16)
#define VFIO_HZ_MAX		100000u
#define VFIO_TIME_SCALE_MIN	1e-3
#define VFIO_TIME_SCALE_MAX	1e9
/*
 * WARN sequence numbers stay below 2^61, so that (seq << VFIO_RET_SEQ_SHIFT)
 * is a positive int64 status; past it (a corrupt or forged head) WARNs are
 * dropped and counted, never returned as a negative status.
 */
#define VFIO_WARN_SEQ_MAX	((1ULL << 61) - 1)

#define REFCOUNT_MAX		0x7fffffff
#define REFCOUNT_SATURATED	(-0x40000000)	/* INT_MIN / 2 */

/* Object kinds stored in a slot. */
enum vfio_kind {
	VFIO_KIND_FREE = 0,
	VFIO_KIND_REFCOUNT = 1,
	VFIO_KIND_KREF = 2,
	VFIO_KIND_COMPLETION = 3,
	VFIO_KIND_MAX = 3,
};

/* The kernel's refcount saturation kinds, plus WARNs raised by higher layers. */
enum vfio_warn_kind {
	VFIO_WARN_ADD_NOT_ZERO_OVF = 1,
	VFIO_WARN_ADD_OVF = 2,
	VFIO_WARN_ADD_UAF = 3,
	VFIO_WARN_SUB_UAF = 4,
	VFIO_WARN_DEC_LEAK = 5,
	VFIO_WARN_OTHER = 6,
};

/*
 * Status codes.  Hot entry points return an int64: negative is one of these,
 * otherwise bit 0 is the boolean result and bit 1 says a WARN was recorded,
 * in which case bits 2.. carry the sequence number of the first one.
 */
enum vfio_status {
	VFIO_OK = 0,
	VFIO_E_STALE = -1,	/* generation mismatch: freed, reused or arena closed */
	VFIO_E_RANGE = -2,	/* slot index out of range */
	VFIO_E_KIND = -3,	/* slot holds another kind of object */
	VFIO_E_FULL = -4,
	VFIO_E_NOENT = -5,
	VFIO_E_EXIST = -6,
	VFIO_E_FOREIGN = -7,	/* no vfio-emu magic */
	VFIO_E_VERSION = -8,
	VFIO_E_TRUNCATED = -9,
	VFIO_E_CORRUPT = -10,	/* header fields disagree with each other */
	VFIO_E_SYS = -11,	/* errno in the out parameter */
	VFIO_E_INVAL = -12,
	VFIO_E_INTR = -13,	/* a signal interrupted the sleep */
	VFIO_E_TIMEDOUT = -14,
	VFIO_E_OWNER = -15,	/* the segment is another user's, or not mode 0600 */
};
#define VFIO_RET_TRUE	1
#define VFIO_RET_WARN	2
#define VFIO_RET_SEQ_SHIFT 2

/* ---- shared memory layout ------------------------------------------- */

struct vfio_slot {
	_Atomic uint32_t gen;		/* odd while allocated, even while free */
	_Atomic uint32_t kind;
	_Atomic int32_t refs;		/* refcount_t / kref */
	_Atomic uint32_t done;		/* completion */
	_Atomic uint32_t waiters;	/* completion: tasks asleep on done */
	_Atomic uint32_t next_free;	/* free list link: index + 1, 0 = end */
	_Atomic uint32_t owner_pid;	/* pid that allocated it */
	uint32_t _reserved;
	char label[VFIO_LABEL_MAX];
	char _pad[VFIO_SLOT_SIZE - 32 - VFIO_LABEL_MAX];
} __attribute__((aligned(VFIO_SLOT_SIZE)));

struct vfio_warn_rec {
	_Atomic uint64_t seq;		/* 0 = empty; seq | VFIO_WARN_BUSY = being written */
	_Atomic int64_t claim_ns;	/* when it was claimed: a claim older than 1 s is dead */
	int64_t time_ns;		/* CLOCK_MONOTONIC */
	uint32_t kind;
	uint32_t pid;
	uint32_t tid;
	uint32_t obj_index;
	uint32_t obj_gen;
	uint32_t obj_kind;
	int32_t old;
	int32_t new;
	char text[VFIO_WARN_TEXT_MAX];
	char label[VFIO_LABEL_MAX];
	char stack[VFIO_WARN_STACK_MAX];
};

struct vfio_arena_hdr {
	uint64_t magic;			/* written last at creation */
	uint32_t version;
	uint32_t slot_size;
	uint32_t capacity;
	uint32_t warn_capacity;
	uint32_t warn_rec_size;
	uint32_t hdr_size;
	uint64_t total_size;
	uint64_t slots_offset;
	uint64_t ring_offset;
	int64_t created_ns;		/* CLOCK_MONOTONIC: the jiffies epoch */
	double time_scale;		/* emulated seconds per real second */
	uint32_t hz;
	uint32_t creator_pid;
	uint64_t incarnation;		/* random, new at every create: tokens carry it */
	uint64_t creator_start;		/* creator's start time (clock ticks since boot) */
	_Atomic uint64_t free_head __attribute__((aligned(128)));	/* tag << 32 | index + 1 */
	_Atomic uint64_t warn_head __attribute__((aligned(128)));	/* last sequence issued */
	_Atomic uint64_t warn_dropped;
};

/* ---- process-local objects ------------------------------------------ */

struct vfio_arena {
	char *base;
	size_t size;
	struct vfio_arena_hdr *hdr;
	struct vfio_slot *slots;
	struct vfio_warn_rec *ring;
	uint32_t capacity;
	uint32_t warn_capacity;
	_Atomic int closed;	/* this process's view is gone (closed, or lost to a truncation) */
	_Atomic int closing;	/* close() has begun: no new slow-path call may start */
	_Atomic int users;	/* slow-path calls in flight in this process (close waits) */
	_Atomic int lost;	/* the segment shrank under us: SIGBUS turned into a closed view */
	int unlinked;
	int owner;
	int64_t spin_ns;
	char name[VFIO_NAME_MAX + 1];
};

typedef struct vfio_arena vfio_arena_t;

typedef struct vfio_handle {
	struct vfio_slot *slot;
	struct vfio_arena *arena;
	uint32_t index;
	uint32_t gen;
} vfio_handle_t;

typedef struct vfio_arena_info {
	uint32_t capacity;
	uint32_t warn_capacity;
	uint32_t hz;
	double time_scale;
	int64_t created_ns;
	uint32_t creator_pid;
	uint64_t incarnation;
	uint64_t creator_start;
	int closed;
	int lost;
	int owner;
	uint64_t warn_head;
	uint64_t warn_dropped;
	int64_t spin_ns;
} vfio_arena_info_t;

typedef struct vfio_slot_info {
	uint32_t gen;
	uint32_t kind;
	int32_t refs;
	uint32_t done;
	uint32_t waiters;
	uint32_t owner_pid;
	char label[VFIO_LABEL_MAX];
} vfio_slot_info_t;

typedef struct vfio_warn_entry {
	uint64_t seq;
	int64_t time_ns;
	uint32_t kind;
	uint32_t pid;
	uint32_t tid;
	uint32_t obj_index;
	uint32_t obj_gen;
	uint32_t obj_kind;
	int32_t old;
	int32_t new;
	char text[VFIO_WARN_TEXT_MAX];
	char label[VFIO_LABEL_MAX];
	char stack[VFIO_WARN_STACK_MAX];
} vfio_warn_entry_t;

/* ---- the API (mirrored by the cdef in build_ffi.py) ------------------- */

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
int64_t vfio_refcount_inc_many(vfio_handle_t *h, int64_t n);
int64_t vfio_refcount_dec_and_test_many(vfio_handle_t *h, int64_t n);
int64_t vfio_kref_pairs(vfio_handle_t *h, int64_t n);
int64_t vfio_refcount_inc_array(vfio_handle_t *const *hs, int64_t n, int64_t *bad);
int64_t vfio_refcount_dec_and_test_array(vfio_handle_t *const *hs, int64_t n, uint8_t *hit,
					 int64_t *bad);

/* completion.c */
int64_t vfio_completion_reinit(vfio_handle_t *h);
int64_t vfio_completion_complete(vfio_handle_t *h);
int64_t vfio_completion_complete_all(vfio_handle_t *h);
int64_t vfio_completion_try_wait(vfio_handle_t *h);
int64_t vfio_completion_done(vfio_handle_t *h);
int64_t vfio_completion_read(vfio_handle_t *h);
int64_t vfio_completion_waiters(vfio_handle_t *h);
int64_t vfio_completion_wait(vfio_handle_t *h, int64_t deadline_ns, int64_t slice_ns, int spin,
			     uint32_t *consumed);

/* warn.c */
const char *vfio_warn_text(uint32_t kind);
int64_t vfio_warn_emit(vfio_arena_t *a, vfio_handle_t *h, uint32_t kind, const char *text);
int vfio_warn_read(const vfio_arena_t *a, uint64_t seq, vfio_warn_entry_t *out);
int vfio_warn_set_stack(vfio_arena_t *a, uint64_t first, const char *stack);

/* ---- internal helpers shared by the .c files ------------------------- */

/*
 * Slow-path calls that write the segment (alloc, free, waits, WARNs) run
 * between vfio_arena_enter() and vfio_arena_exit(), so that close() from
 * another thread of this process waits for them instead of swapping the
 * mapping under them (a slot popped but never marked, a waiter counted
 * forever).  The hot refcount path does not: see docs/semantics.md.
 */
static inline int vfio_arena_enter(struct vfio_arena *a)
{
	atomic_fetch_add_explicit(&a->users, 1, memory_order_seq_cst);
	if (atomic_load_explicit(&a->closing, memory_order_seq_cst)) {
		atomic_fetch_sub_explicit(&a->users, 1, memory_order_seq_cst);
		return 0;
	}
	return 1;
}

static inline void vfio_arena_exit(struct vfio_arena *a)
{
	atomic_fetch_sub_explicit(&a->users, 1, memory_order_release);
}

void vfio_futex_wake(_Atomic uint32_t *word, int n);
uint64_t vfio_warn_record(struct vfio_arena *a, uint32_t kind, const vfio_handle_t *h,
			  int32_t old, int32_t new, const char *text);

static inline int vfio_handle_ok(const vfio_handle_t *h)
{
	return atomic_load_explicit(&h->slot->gen, memory_order_relaxed) == h->gen;
}

#define vfio_likely(x)		__builtin_expect(!!(x), 1)
#define vfio_unlikely(x)	__builtin_expect(!!(x), 0)

/* Every handle-taking entry point starts with this: stale handles never touch the object. */
#define VFIO_CHECK_HANDLE(h)						\
	do {								\
		if (vfio_unlikely(!vfio_handle_ok(h)))			\
			return VFIO_E_STALE;				\
	} while (0)

_Static_assert(sizeof(struct vfio_slot) == VFIO_SLOT_SIZE, "one slot per 128-byte block");
_Static_assert(sizeof(struct vfio_warn_rec) == VFIO_WARN_REC_SIZE, "WARN record size");
_Static_assert(offsetof(struct vfio_warn_rec, text) == VFIO_WARN_REC_HDR, "WARN record header");
_Static_assert(sizeof(struct vfio_arena_hdr) <= VFIO_HDR_SIZE, "header fits its page");
/* Atomics shared between processes must not be emulated with a process-local lock. */
_Static_assert(ATOMIC_INT_LOCK_FREE == 2 && ATOMIC_LLONG_LOCK_FREE == 2, "lock-free atomics");

#endif /* VFIO_EMU_H */
