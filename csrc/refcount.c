// SPDX-License-Identifier: MIT
/*
 * refcount.c - refcount_t with the exact Linux v6.1 semantics (generic
 * implementation: include/linux/refcount.h, lib/refcount.c), and the batch
 * entry points that amortise the Python crossing.  kref is refcount_t with
 * other names, so the Python Kref binds these same functions.
 *
 * Orderings follow the kernel: increments relaxed, decrements release, an
 * acquire fence on the path that reaches zero.  The saturation check runs
 * after the atomic, so its fix-up store races with concurrent users exactly
 * as the kernel's does.  Every entry point first checks the handle's
 * generation: one relaxed load, invisible behind the call itself.
 */
#include "vfio_emu.h"

#include <limits.h>

static inline int32_t wrap_add(int32_t a, int32_t b)
{
	return (int32_t)((uint32_t)a + (uint32_t)b);
}

static inline int32_t wrap_sub(int32_t a, int32_t b)
{
	return (int32_t)((uint32_t)a - (uint32_t)b);
}

static inline int64_t warned(uint64_t seq)
{
	return VFIO_RET_WARN | (int64_t)(seq << VFIO_RET_SEQ_SHIFT);
}

/* refcount_warn_saturate(): always store SATURATED first, then WARN. */
static __attribute__((noinline)) int64_t saturate(vfio_handle_t *h, uint32_t kind, int32_t old)
{
	atomic_store_explicit(&h->slot->refs, REFCOUNT_SATURATED, memory_order_relaxed);
	return warned(vfio_warn_record(h->arena, kind, h, old, REFCOUNT_SATURATED, NULL));
}

/* Fold one result into a batch result: any TRUE, the first WARN's sequence. */
static inline int64_t merge(int64_t acc, int64_t r)
{
	if ((r & VFIO_RET_WARN) && !(acc & VFIO_RET_WARN))
		acc |= r & ~(int64_t)VFIO_RET_TRUE;
	return acc | (r & VFIO_RET_TRUE);
}

static inline int64_t op_add(vfio_handle_t *h, int32_t i)
{
	int32_t old = atomic_fetch_add_explicit(&h->slot->refs, i, memory_order_relaxed);

	if (vfio_unlikely(!old))
		return saturate(h, VFIO_WARN_ADD_UAF, old);
	if (vfio_unlikely(old < 0 || wrap_add(old, i) < 0))
		return saturate(h, VFIO_WARN_ADD_OVF, old);
	return 0;
}

static inline int64_t op_add_not_zero(vfio_handle_t *h, int32_t i)
{
	int32_t old = atomic_load_explicit(&h->slot->refs, memory_order_relaxed);

	do {
		if (!old)
			break;
	} while (!atomic_compare_exchange_weak_explicit(&h->slot->refs, &old, wrap_add(old, i),
							 memory_order_relaxed,
							 memory_order_relaxed));
	if (vfio_unlikely(old < 0 || wrap_add(old, i) < 0))
		return saturate(h, VFIO_WARN_ADD_NOT_ZERO_OVF, old) | (old != 0);
	return old != 0;
}

static inline int64_t op_sub_and_test(vfio_handle_t *h, int32_t i)
{
	int32_t old = atomic_fetch_sub_explicit(&h->slot->refs, i, memory_order_release);

	if (old == i) {
		atomic_thread_fence(memory_order_acquire);
		return VFIO_RET_TRUE;
	}
	if (vfio_unlikely(old < 0 || wrap_sub(old, i) < 0))
		return saturate(h, VFIO_WARN_SUB_UAF, old);
	return 0;
}

int64_t vfio_refcount_set(vfio_handle_t *h, int32_t n)
{
	VFIO_CHECK_HANDLE(h);
	atomic_store_explicit(&h->slot->refs, n, memory_order_relaxed);
	return 0;
}

int64_t vfio_refcount_read(vfio_handle_t *h)
{
	VFIO_CHECK_HANDLE(h);
	return (uint32_t)atomic_load_explicit(&h->slot->refs, memory_order_relaxed);
}

int64_t vfio_refcount_inc(vfio_handle_t *h)
{
	VFIO_CHECK_HANDLE(h);
	return op_add(h, 1);
}

int64_t vfio_refcount_add(vfio_handle_t *h, int32_t i)
{
	VFIO_CHECK_HANDLE(h);
	return op_add(h, i);
}

int64_t vfio_refcount_inc_not_zero(vfio_handle_t *h)
{
	VFIO_CHECK_HANDLE(h);
	return op_add_not_zero(h, 1);
}

int64_t vfio_refcount_add_not_zero(vfio_handle_t *h, int32_t i)
{
	VFIO_CHECK_HANDLE(h);
	return op_add_not_zero(h, i);
}

int64_t vfio_refcount_dec_and_test(vfio_handle_t *h)
{
	VFIO_CHECK_HANDLE(h);
	return op_sub_and_test(h, 1);
}

int64_t vfio_refcount_sub_and_test(vfio_handle_t *h, int32_t i)
{
	VFIO_CHECK_HANDLE(h);
	return op_sub_and_test(h, i);
}

int64_t vfio_refcount_dec(vfio_handle_t *h)
{
	int32_t old;

	VFIO_CHECK_HANDLE(h);
	old = atomic_fetch_sub_explicit(&h->slot->refs, 1, memory_order_release);
	if (vfio_unlikely(old <= 1))
		return saturate(h, VFIO_WARN_DEC_LEAK, old);
	return 0;
}

int64_t vfio_refcount_dec_if_one(vfio_handle_t *h)
{
	int32_t one = 1;

	VFIO_CHECK_HANDLE(h);
	return atomic_compare_exchange_strong_explicit(&h->slot->refs, &one, 0,
						       memory_order_release,
						       memory_order_relaxed);
}

/* v6.1 quirk kept: on 0 it WARNs "underflow" but neither moves nor saturates. */
int64_t vfio_refcount_dec_not_one(vfio_handle_t *h)
{
	int32_t val;
	uint32_t next;

	VFIO_CHECK_HANDLE(h);
	val = atomic_load_explicit(&h->slot->refs, memory_order_relaxed);
	do {
		if (val == REFCOUNT_SATURATED)
			return VFIO_RET_TRUE;
		if (val == 1)
			return 0;
		next = (uint32_t)val - 1;
		if (next > (uint32_t)val)
			return VFIO_RET_TRUE |
			       warned(vfio_warn_record(h->arena, VFIO_WARN_SUB_UAF, h, val, val,
						       NULL));
	} while (!atomic_compare_exchange_weak_explicit(&h->slot->refs, &val, (int32_t)next,
							 memory_order_release,
							 memory_order_relaxed));
	return VFIO_RET_TRUE;
}

/* ---- batches ---------------------------------------------------------- */

/* n x refcount_inc (kref_get) on one object. */
int64_t vfio_refcount_inc_many(vfio_handle_t *h, int64_t n)
{
	int64_t acc = 0;

	VFIO_CHECK_HANDLE(h);
	while (n-- > 0)
		acc = merge(acc, op_add(h, 1));
	return acc;
}

/* n x refcount_dec_and_test (kref_put); TRUE if one of them reached zero. */
int64_t vfio_refcount_dec_and_test_many(vfio_handle_t *h, int64_t n)
{
	int64_t acc = 0;

	VFIO_CHECK_HANDLE(h);
	while (n-- > 0)
		acc = merge(acc, op_sub_and_test(h, 1));
	return acc;
}

/* n x (kref_get; kref_put): the benchmarks' batch loop. */
int64_t vfio_kref_pairs(vfio_handle_t *h, int64_t n)
{
	int64_t acc = 0;

	VFIO_CHECK_HANDLE(h);
	while (n-- > 0) {
		acc = merge(acc, op_add(h, 1));
		acc = merge(acc, op_sub_and_test(h, 1));
	}
	return acc;
}

/* Every handle is checked before any count moves: nothing half-done. */
static int64_t check_array(vfio_handle_t *const *hs, int64_t n, int64_t *bad)
{
	for (int64_t i = 0; i < n; i++) {
		if (!hs[i] || !vfio_handle_ok(hs[i])) {
			*bad = i;
			return VFIO_E_STALE;
		}
	}
	*bad = -1;
	return 0;
}

int64_t vfio_refcount_inc_array(vfio_handle_t *const *hs, int64_t n, int64_t *bad)
{
	int64_t acc = check_array(hs, n, bad);

	if (acc < 0)
		return acc;
	for (int64_t i = 0; i < n; i++)
		acc = merge(acc, op_add(hs[i], 1));
	return acc;
}

/* hit[i] is set for every object whose count reached zero. */
int64_t vfio_refcount_dec_and_test_array(vfio_handle_t *const *hs, int64_t n, uint8_t *hit,
					 int64_t *bad)
{
	int64_t acc = check_array(hs, n, bad), r;

	if (acc < 0)
		return acc;
	for (int64_t i = 0; i < n; i++) {
		r = op_sub_and_test(hs[i], 1);
		hit[i] = r & VFIO_RET_TRUE;
		acc = merge(acc, r);
	}
	return acc;
}
