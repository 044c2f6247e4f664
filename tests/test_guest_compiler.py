import pytest
from iced_x86 import Decoder, Formatter, FormatterSyntax

from guestmem import machine
from guestmem import program as p
from guestmem.guest import compile_program, default_hypercall_abi


def disassemble(code: bytes) -> list[str]:
    fmt = Formatter(FormatterSyntax.INTEL)
    return [fmt.format(ins) for ins in Decoder(64, code, ip=machine.CODE)]


def test_map_gpa_range_through_the_port_doorbell():
    prog = p.Program.of(p.MapGpaRange(1 << 32, 512, 2 << 20))
    text = "\n".join(disassemble(compile_program(prog, "port").code))
    assert "mov rax,0Ch" in text  # KVM_HC_MAP_GPA_RANGE
    assert "mov rbx,100000000h" in text
    assert "mov rcx,200h" in text
    assert "mov rdx,11h" in text  # 2M | ENCRYPTED
    assert "out 0ECh,eax" in text and "vmcall" not in text


@pytest.mark.parametrize("abi", ["vmcall", "vmmcall"])
def test_map_gpa_range_upstream_convention(abi):
    text = "\n".join(disassemble(compile_program(p.Program.of(p.MapGpaRange(0, 1, encrypted=False)),
                                                 abi).code))
    assert "mov rcx,1" in text and "mov rdx,0" in text and abi in text


def test_reports_are_two_32_bit_outs_and_halt_is_port_done():
    text = disassemble(compile_program(p.Program.of(p.Report(5))).code)
    assert text.count("out 0E0h,eax") == 1 and text.count("out 0E4h,eax") == 1
    assert "out 0F4h,eax" in text


def test_bad_programs_are_rejected():
    with pytest.raises(ValueError):
        compile_program(p.Program.of(p.WritePattern(4, 8, 0)))  # unaligned
    with pytest.raises(ValueError):
        compile_program(p.Program.of(p.MapGpaRange(0, 1, page_size=8192)))
    with pytest.raises(ValueError):
        compile_program(p.Program.of(p.Report(0)), "int80")
    nested = p.Report(1)
    for _ in range(5):
        nested = p.Loop(2, (nested,))
    with pytest.raises(ValueError):
        compile_program(p.Program.of(nested))


def test_program_of_appends_halt_once():
    assert p.Program.of(p.Report(1)).steps[-1] == p.Halt()
    assert p.Program.of(p.Halt()).steps == (p.Halt(),)


def caps_with(**execution):
    """The mainline model's capability record with another GuestExecution."""
    from dataclasses import replace

    from guestmem.caps import UPSTREAM_EXECUTION
    from guestmem.model import PROFILES, Kvm

    profile = replace(PROFILES["mainline"], execution=replace(UPSTREAM_EXECUTION, **execution))
    with Kvm(profile) as kvm:
        return kvm.capabilities


def test_default_abi_follows_the_cpu_vendor_and_the_probed_execution():
    from guestmem.caps import VENDOR_AMD, VENDOR_INTEL, HypercallOutcome

    # VMX/SVM: CPL0 guests, the vendor's own instruction exits to userspace.
    assert default_hypercall_abi(caps_with(cpu_vendor=VENDOR_INTEL)) == "vmcall"
    assert default_hypercall_abi(caps_with(cpu_vendor=VENDOR_AMD)) == "vmmcall"
    # A CPL3 guest cannot reach userspace with either: the port doorbell.
    assert default_hypercall_abi(caps_with(cpu_vendor=VENDOR_AMD), cpl=3) == "port"
    # kvm_pvm: CPL0 is emulated (so guests run at CPL3) and its VMCALL never returns.
    pvm = caps_with(cpu_vendor=VENDOR_AMD, emulated_cpls=frozenset({0}),
                    cpl0_hypercall=HypercallOutcome.NEVER_RETURNS)
    assert pvm.execution.default_cpl == 3
    assert default_hypercall_abi(pvm) == "port"
    assert default_hypercall_abi(pvm, cpl=0) == "port"


def test_page_tables_identity_map_64_gib_with_2m_pages():
    tables = dict(machine.page_tables())
    pds = tables[machine.PD_BASE]
    entry = int.from_bytes(pds[8 * 512 * 4: 8 * 512 * 4 + 8], "little")  # first 2M of 4 GiB
    assert entry & ~0xFFF == 4 << 30 and entry & machine.PTE_HUGE and entry & machine.PTE_USER
    assert machine.PD_BASE + len(pds) <= machine.GDT
    assert machine.CODE >= machine.IDT + 0x1000


@pytest.mark.parametrize("step", [p.WritePattern, p.VerifyPattern])
@pytest.mark.parametrize("gpa, length", [(4, 8), (0, 12), (0, 0), (8, -8)])
def test_a_pattern_range_must_be_whole_words(step, gpa, length):
    """The guest code reads and writes whole 64-bit words, so both backends refuse a
    pattern range that is not 8-byte aligned, when the step is made."""
    with pytest.raises(ValueError, match="must be 8-byte aligned"):
        step(gpa, length, 0)
