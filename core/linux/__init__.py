"""The emulated kernel a driver programs against: one module per kernel header.

A driver plugin writes ``from vfio_emu.linux.vfio import vfio_alloc_device``
as its C source writes ``#include <linux/vfio.h>``:

  errno   the errnos, returned negated as in C
  slab    kzalloc/kfree, with KASAN watching freed memory
  device  struct device: bus devices and refcounted ones (the kobject)
  vfio    struct vfio_device, its two counters, device sets, register/unregister,
          the device FD
  mdev    the mdev core: parents, types, instances
  kernel  the state one emulated kernel keeps (what C keeps in globals), its
          reports, watchdog, workqueue and fault injection
  trace   the life-cycle events, as a timeline

refcount_t, kref and completion are the arena's (vfio_emu.shm), re-exported
by vfio_emu itself; a driver gets its completions from kernel.arena.
"""
