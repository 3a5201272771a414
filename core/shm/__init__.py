"""The shared-memory layer: the arena and the kernel primitives that live in it.

An Arena is a POSIX shared-memory segment of 128-byte slots; refcount_t, kref
and completion each live in a slot, with the exact Linux v6.1 semantics, and
several processes can hold references to the same object.  The WARN ring
("dmesg") is in the segment too.  `_binding` is the only module that
touches the two cffi extension modules built from csrc/.
"""
