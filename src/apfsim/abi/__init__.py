"""The guest-visible ABI of each architecture's async PF: constants and shared-block layouts.

One module per arch, mirroring ``arch/*/include/uapi/asm/kvm_para.h`` (and, for the arm64
series that never merged, the patches' own headers). Host and guest modules both import
from here and never from each other, as the kernel's two halves share only the uapi header.
"""
