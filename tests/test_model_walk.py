"""The model vCPU's page walk: per run of contiguous leaves, never per page."""

from guestmem import machine, uapi
from guestmem import program as p
from guestmem.guest import compile_program, default_hypercall_abi
from guestmem.model import Kvm
from guestmem.vmm import Vmm

GIB = 1 << 30


def run(vmm, kvm, *steps):
    vmm.load(compile_program(p.Program.of(*steps), default_hypercall_abi(kvm.capabilities,
                                                                         vmm.cpl)))
    return vmm.run(timeout=0)


def test_a_large_write_stays_one_extent():
    """8 GiB through 4096 leaves of 2 MiB that map contiguous memory: one run, so
    the guest_memfd's contents are one pattern extent (scale is correctness)."""
    with Kvm("mainline") as kvm, Vmm(kvm) as vmm:
        region = vmm.add_memory(4 * GIB, 8 * GIB)
        result = run(vmm, kvm, p.WritePattern(4 * GIB, 8 * GIB, 1, 1),
                     p.VerifyPattern(4 * GIB, 8 * GIB, 1, 1))
        assert (result.stop, result.reports) == ("done", [p.VERIFY_OK])
        store = region.guest_memfd.inode.store
        assert len(store.extents) == 1


def test_page_tables_in_private_memory_are_read_from_the_guest_memfd():
    """With TDP the CPU walks the tables where the MMU maps them: once the guest's
    page-table pages are private, the walk reads the (zeroed) guest_memfd pages,
    faults, and the guest shuts down."""
    with Kvm("coco") as kvm, Vmm(kvm, uapi.KVM_X86_SW_PROTECTED_VM) as vmm:
        assert run(vmm, kvm, p.Report(5)).reports == [5]
        vmm.vm.set_memory_attributes(0, 1 << 20, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        assert run(vmm, kvm, p.ReadValue(machine.CODE)).stop == "shutdown"


def test_a_ps_bit_in_a_pml4_entry_is_reserved():
    with Kvm("mainline") as kvm, Vmm(kvm) as vmm:
        vmm.add_memory(4 * GIB, 4096)
        entry = int.from_bytes(vmm.read(machine.PML4, 8), "little")
        vmm.write(machine.PML4, (entry | machine.PTE_HUGE).to_bytes(8, "little"))
        vmm._tables_written = True  # keep the edited table
        assert run(vmm, kvm, p.ReadValue(4 * GIB)).stop == "shutdown"
