"""Driver plugins for vfio-emu (vfio_emu.plugins): one module per emulated driver."""
