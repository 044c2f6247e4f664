"""Layer 5: guest programs compiled to x86-64 machine code."""

from guestmem.guest.x86 import HYPERCALL_ABIS, compile_program, default_hypercall_abi

__all__ = ["HYPERCALL_ABIS", "compile_program", "default_hypercall_abi"]
