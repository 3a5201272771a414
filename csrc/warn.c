// SPDX-License-Identifier: MIT
/*
 * warn.c - the WARN log ("dmesg"): a ring of fixed-size records inside the
 * arena, written by whichever process hit the WARN and readable by all.
 *
 * A record is claimed by swapping its sequence word to BUSY and published by
 * storing the new sequence; a reader copies it and keeps the copy only if
 * the sequence word was the same before and after.  A writer killed halfway
 * leaves BUSY behind, which readers skip and the next writer reclaims.
 */
#define _GNU_SOURCE
#include "vfio_emu.h"

#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define REC_BUSY UINT64_MAX

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

static void copy_str(char *dst, size_t size, const char *src)
{
	size_t n = src ? strnlen(src, size - 1) : 0;

	memcpy(dst, src ? src : "", n);
	memset(dst + n, 0, size - n);
}

/* Record one WARN; returns its sequence number (0 if it had to be dropped). */
uint64_t vfio_warn_record(struct vfio_arena *a, uint32_t kind, const vfio_handle_t *h,
			  int32_t old, int32_t new, const char *text)
{
	struct vfio_arena_hdr *hdr = a->hdr;
	struct vfio_warn_rec *r;
	uint64_t seq, cur;

	if (a->closed)
		return 0;
	seq = atomic_fetch_add_explicit(&hdr->warn_head, 1, memory_order_relaxed) + 1;
	r = &a->ring[(seq - 1) % a->warn_capacity];
	cur = atomic_load_explicit(&r->seq, memory_order_relaxed);
	/* Claim the record unless a newer writer already owns it. */
	do {
		if (cur != REC_BUSY && cur != 0 && cur >= seq) {
			atomic_fetch_add_explicit(&hdr->warn_dropped, 1, memory_order_relaxed);
			return 0;
		}
	} while (!atomic_compare_exchange_weak_explicit(&r->seq, &cur, REC_BUSY,
							 memory_order_acquire,
							 memory_order_relaxed));
	r->time_ns = vfio_monotonic_ns();
	r->kind = kind;
	r->pid = (uint32_t)getpid();
	r->tid = (uint32_t)syscall(SYS_gettid);
	r->obj_index = h ? (uint32_t)(h->slot - a->slots) : UINT32_MAX;
	r->obj_gen = h ? h->gen : 0;
	r->obj_kind = h ? atomic_load_explicit(&h->slot->kind, memory_order_relaxed) : 0;
	r->old = old;
	r->new = new;
	copy_str(r->text, sizeof(r->text), text ? text : vfio_warn_text(kind));
	copy_str(r->label, sizeof(r->label), h ? h->slot->label : NULL);
	r->stack[0] = 0;
	atomic_store_explicit(&r->seq, seq, memory_order_release);
	return seq;
}

/* A WARN raised by a higher layer (Python), with its own text. */
int64_t vfio_warn_emit(vfio_arena_t *a, vfio_handle_t *h, uint32_t kind, const char *text)
{
	if (a->closed)
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

	if (a->closed)
		return VFIO_E_STALE;
	if (!seq)
		return VFIO_E_RANGE;
	r = &a->ring[(seq - 1) % a->warn_capacity];
	s1 = atomic_load_explicit(&r->seq, memory_order_acquire);
	if (s1 != seq)
		return VFIO_E_STALE;
	out->seq = seq;
	out->time_ns = r->time_ns;
	out->kind = r->kind;
	out->pid = r->pid;
	out->tid = r->tid;
	out->obj_index = r->obj_index;
	out->obj_gen = r->obj_gen;
	out->obj_kind = r->obj_kind;
	out->old = r->old;
	out->new = r->new;
	memcpy(out->text, r->text, sizeof(out->text));
	memcpy(out->label, r->label, sizeof(out->label));
	memcpy(out->stack, r->stack, sizeof(out->stack));
	atomic_thread_fence(memory_order_acquire);
	s2 = atomic_load_explicit(&r->seq, memory_order_relaxed);
	if (s2 != seq)
		return VFIO_E_STALE;
	out->text[sizeof(out->text) - 1] = 0;
	out->label[sizeof(out->label) - 1] = 0;
	out->stack[sizeof(out->stack) - 1] = 0;
	return VFIO_OK;
}

/*
 * Attach the caller's Python stack to the records from 'first' on that this
 * thread wrote and that have no stack yet (one call may WARN several times).
 */
int vfio_warn_set_stack(vfio_arena_t *a, uint64_t first, const char *stack)
{
	uint32_t pid = (uint32_t)getpid(), tid = (uint32_t)syscall(SYS_gettid);
	uint64_t head, seq;
	int n = 0;

	if (a->closed)
		return VFIO_E_STALE;
	head = atomic_load_explicit(&a->hdr->warn_head, memory_order_acquire);
	if (first && head >= a->warn_capacity && first <= head - a->warn_capacity)
		first = head - a->warn_capacity + 1;
	for (seq = first ? first : 1; seq <= head; seq++) {
		struct vfio_warn_rec *r = &a->ring[(seq - 1) % a->warn_capacity];
		uint64_t cur = seq;

		/* Cheap unlocked look first, so other writers' records are left alone. */
		if (r->pid != pid || r->tid != tid || r->stack[0])
			continue;
		if (!atomic_compare_exchange_strong_explicit(&r->seq, &cur, REC_BUSY,
							     memory_order_acquire,
							     memory_order_relaxed))
			continue;
		if (r->pid == pid && r->tid == tid && !r->stack[0]) {
			copy_str(r->stack, sizeof(r->stack), stack);
			n++;
		}
		atomic_store_explicit(&r->seq, seq, memory_order_release);
	}
	return n;
}
