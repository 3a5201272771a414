"""The tools that drive the emulated kernel: the check battery, named scenarios, lkdtm.

They use drivers only through their plugin hooks and the emulated kernel's
public API, and turn what the kernel reports into verdicts.
"""
