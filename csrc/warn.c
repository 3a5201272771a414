// SPDX-License-Identifier: MIT
/*
 * warn.c - the WARN log ("dmesg"): a ring of fixed-size records inside the
 * arena, written by whichever process hit the WARN and readable by all.
 *
 * A writer claims its record by a CAS of the record's sequence word to
 * "seq | BUSY", fills it, and publishes it by a CAS from exactly that claim
 * back to seq.  A record found BUSY belongs to a live writer and is left
 * alone (the newcomer drops its WARN and counts it in warn_dropped), unless
 * the claim is over a second old: then its writer died halfway and the
 * record is taken over.  A reader keeps a copy only if the sequence word was
 * the same, and not BUSY, before and after copying.
 */
#define _GNU_SOURCE
#include "vfio_emu.h"

#include <stddef.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define REC_BUSY (1ULL << 63)
#define STALE_CLAIM_NS 1000000000LL

static const char *const refcount_texts[] = {
	[VFIO_WARN_ADD_NOT_ZERO_OVF] = "refcount_t: saturated; leaking memory.",
	[VFIO_WARN_ADD_OVF] = "refcount_t: saturated; leaking memory.",
	[VFIO_WARN_ADD_UAF] = "refcount_t: addition on 0; use-after-free.",
	[VFIO_WARN_SUB_UAF] = "refcount_t: underflow; use-after-free.",
	[VFIO_WARN_DEC_LEAK] = "refcount_t: decrement hit 0; leaking memory.",
};

const char *vfio_warn_text(uint32_t kind)
{
	if (kind >= VFIO_WARN_ADD_NOT_ZERO_OVF && kind <= VFIO_WARN_DEC_LEAK)
		return refcount_texts[kind];
	return "";
}

/*
 * A record's fields are written by one process while another may be copying
 * them out (the reader keeps its copy only if the sequence word did not move,
 * as in a seqlock), so every access to them is a relaxed atomic: the
 * protocol, not luck, keeps a torn copy from being used.  The text fields are
 * 8-byte aligned multiples of 8 bytes and move a word at a time.
 */
#define PUT(field, value) __atomic_store_n(&(field), (value), __ATOMIC_RELAXED)
#define GET(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)

_Static_assert(offsetof(struct vfio_warn_rec, text) % 8 == 0 &&
	       offsetof(struct vfio_warn_rec, label) % 8 == 0 &&
	       offsetof(struct vfio_warn_rec, stack) % 8 == 0 &&
	       VFIO_WARN_TEXT_MAX % 8 == 0 && VFIO_LABEL_MAX % 8 == 0 &&
	       VFIO_WARN_STACK_MAX % 8 == 0, "text fields move a word at a time");

/* Store a NUL-terminated copy of src (cut to size - 1) into a record field. */
static void put_str(char *field, size_t size, const char *src)
{
	uint64_t word;
	size_t n = src ? strnlen(src, size - 1) : 0;

	for (size_t off = 0; off < size; off += 8) {
		char chunk[8] = {0};

		if (off < n)
			memcpy(chunk, src + off, n - off < 8 ? n - off : 8);
		memcpy(&word, chunk, 8);
		__atomic_store_n((uint64_t *)(field + off), word, __ATOMIC_RELAXED);
	}
}

static void get_str(char *dst, const char *field, size_t size)
{
	for (size_t off = 0; off < size; off += 8) {
		uint64_t word = __atomic_load_n((const uint64_t *)(field + off), __ATOMIC_RELAXED);

		memcpy(dst + off, &word, 8);
	}
	dst[size - 1] = 0;
}

/*
 * Claim r for writing record 'seq'; 0 if a newer or a live writer has it.  A
 * sequence past the head, or a claim stamped in the future, can only be
 * garbage (a corrupt or forged ring): such a record is taken, not obeyed.
 */
static int claim(struct vfio_arena *a, struct vfio_warn_rec *r, uint64_t seq)
{
	uint64_t cur = atomic_load_explicit(&r->seq, memory_order_relaxed);

	for (;;) {
		uint64_t head = atomic_load_explicit(&a->hdr->warn_head, memory_order_relaxed);
		int garbage = (cur & ~REC_BUSY) > head;

		if (!garbage && (cur & ~REC_BUSY) >= seq)
			return 0;
		if ((cur & REC_BUSY) && !garbage) {
			int64_t age = vfio_monotonic_ns() -
				      atomic_load_explicit(&r->claim_ns, memory_order_relaxed);

			if (age >= 0 && age < STALE_CLAIM_NS)
				return 0;
		}
		if (atomic_compare_exchange_weak_explicit(&r->seq, &cur, seq | REC_BUSY,
							  memory_order_acquire,
							  memory_order_relaxed))
			break;
	}
	atomic_store_explicit(&r->claim_ns, vfio_monotonic_ns(), memory_order_relaxed);
	return 1;
}

/* Publish 'seq'; fails only if the claim was taken over meanwhile. */
static int publish(struct vfio_warn_rec *r, uint64_t seq)
{
	uint64_t busy = seq | REC_BUSY;

	return atomic_compare_exchange_strong_explicit(&r->seq, &busy, seq,
						       memory_order_release,
						       memory_order_relaxed);
}

static uint64_t warn_record(struct vfio_arena *a, uint32_t kind, const vfio_handle_t *h,
			    int32_t old, int32_t new, const char *text)
{
	struct vfio_arena_hdr *hdr = a->hdr;
	struct vfio_warn_rec *r;
	char label[VFIO_LABEL_MAX];
	uint64_t seq;

	seq = atomic_fetch_add_explicit(&hdr->warn_head, 1, memory_order_relaxed) + 1;
	/* A head past the limit is corrupt or forged: never hand out such a sequence. */
	if (seq == 0 || seq > VFIO_WARN_SEQ_MAX)
		goto dropped;
	r = &a->ring[(seq - 1) % a->warn_capacity];
	if (!claim(a, r, seq))
		goto dropped;
	PUT(r->time_ns, vfio_monotonic_ns());
	PUT(r->kind, kind);
	PUT(r->pid, (uint32_t)getpid());
	PUT(r->tid, (uint32_t)syscall(SYS_gettid));
	PUT(r->obj_index, h ? (uint32_t)(h->slot - a->slots) : UINT32_MAX);
	PUT(r->obj_gen, h ? h->gen : 0);
	PUT(r->obj_kind, h ? atomic_load_explicit(&h->slot->kind, memory_order_relaxed) : 0);
	PUT(r->old, old);
	PUT(r->new, new);
	put_str(r->text, sizeof(r->text), text ? text : vfio_warn_text(kind));
	if (h) {	/* the slot's label: another process may be relabelling it */
		for (size_t i = 0; i < sizeof(label); i++)
			label[i] = __atomic_load_n(&h->slot->label[i], __ATOMIC_RELAXED);
		label[sizeof(label) - 1] = 0;
	}
	put_str(r->label, sizeof(r->label), h ? label : NULL);
	put_str(r->stack, sizeof(r->stack), NULL);
	if (publish(r, seq))
		return seq;
dropped:
	atomic_fetch_add_explicit(&hdr->warn_dropped, 1, memory_order_relaxed);
	return 0;
}

/* Record one WARN; returns its sequence number (0 if it had to be dropped). */
uint64_t vfio_warn_record(struct vfio_arena *a, uint32_t kind, const vfio_handle_t *h,
			  int32_t old, int32_t new, const char *text)
{
	uint64_t seq = 0;

	if (!vfio_arena_enter(a))
		return 0;
	if (!atomic_load_explicit(&a->closed, memory_order_acquire))
		seq = warn_record(a, kind, h, old, new, text);
	vfio_arena_exit(a);
	return seq;
}

/* A WARN raised by a higher layer (Python), with its own text. */
int64_t vfio_warn_emit(vfio_arena_t *a, vfio_handle_t *h, uint32_t kind, const char *text)
{
	if (atomic_load_explicit(&a->closed, memory_order_acquire))
		return VFIO_E_STALE;
	if (h && !vfio_handle_ok(h))
		return VFIO_E_STALE;
	return (int64_t)vfio_warn_record(a, kind, h, 0, 0, text);
}

/* Copy record 'seq' out; VFIO_E_STALE if it was overwritten or never written. */
int vfio_warn_read(const vfio_arena_t *a, uint64_t seq, vfio_warn_entry_t *out)
{
	struct vfio_warn_rec *r;
	uint64_t s1, s2;

	if (atomic_load_explicit(&((vfio_arena_t *)a)->closed, memory_order_acquire))
		return VFIO_E_STALE;
	if (!seq || seq > VFIO_WARN_SEQ_MAX)
		return VFIO_E_RANGE;
	r = &a->ring[(seq - 1) % a->warn_capacity];
	s1 = atomic_load_explicit(&r->seq, memory_order_acquire);
	if (s1 != seq)
		return VFIO_E_STALE;	/* overwritten, dropped, or being written */
	out->seq = seq;
	out->time_ns = GET(r->time_ns);
	out->kind = GET(r->kind);
	out->pid = GET(r->pid);
	out->tid = GET(r->tid);
	out->obj_index = GET(r->obj_index);
	out->obj_gen = GET(r->obj_gen);
	out->obj_kind = GET(r->obj_kind);
	out->old = GET(r->old);
	out->new = GET(r->new);
	get_str(out->text, r->text, sizeof(out->text));
	get_str(out->label, r->label, sizeof(out->label));
	get_str(out->stack, r->stack, sizeof(out->stack));
	atomic_thread_fence(memory_order_acquire);
	s2 = atomic_load_explicit(&r->seq, memory_order_relaxed);
	if (s2 != seq)
		return VFIO_E_STALE;
	return VFIO_OK;
}

/*
 * Attach the caller's Python stack to the records from 'first' on (within
 * the ring) that this thread wrote and that have no stack yet: one call may
 * WARN several times.  Returns how many records got it.
 */
static int set_stack(vfio_arena_t *a, uint64_t first, const char *stack)
{
	uint32_t pid = (uint32_t)getpid(), tid = (uint32_t)syscall(SYS_gettid);
	uint64_t head, seq, oldest;
	int n = 0;

	head = atomic_load_explicit(&a->hdr->warn_head, memory_order_acquire);
	if (head > VFIO_WARN_SEQ_MAX)
		head = VFIO_WARN_SEQ_MAX;	/* a forged head: no record past it was written */
	oldest = head >= a->warn_capacity ? head - a->warn_capacity + 1 : 1;
	/* At most warn_capacity records, whatever the shared words say. */
	for (seq = first > oldest ? first : oldest; seq <= head; seq++) {
		struct vfio_warn_rec *r = &a->ring[(seq - 1) % a->warn_capacity];
		uint64_t cur = seq;

		/* A cheap look first, so other writers' records are left alone. */
		if (GET(r->pid) != pid || GET(r->tid) != tid || GET(r->stack[0]))
			continue;
		if (!atomic_compare_exchange_strong_explicit(&r->seq, &cur, seq | REC_BUSY,
							     memory_order_acquire,
							     memory_order_relaxed))
			continue;
		atomic_store_explicit(&r->claim_ns, vfio_monotonic_ns(), memory_order_relaxed);
		if (GET(r->pid) == pid && GET(r->tid) == tid && !GET(r->stack[0])) {
			put_str(r->stack, sizeof(r->stack), stack);
			n++;
		}
		publish(r, seq);
	}
	return n;
}

int vfio_warn_set_stack(vfio_arena_t *a, uint64_t first, const char *stack)
{
	int n = VFIO_E_STALE;

	if (!vfio_arena_enter(a))
		return VFIO_E_STALE;
	if (!atomic_load_explicit(&a->closed, memory_order_acquire))
		n = set_stack(a, first, stack);
	vfio_arena_exit(a);
	return n;
}
