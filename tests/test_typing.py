"""What a user's type checker sees: guestmem.Kvm() has a precise type, never Any."""

import textwrap

from mypy import api

SNIPPET = textwrap.dedent("""
    import guestmem
    reveal_type(guestmem.Kvm())
    reveal_type(guestmem.Kvm("kvm"))
    reveal_type(guestmem.Kvm("model").create_vm().create_guest_memfd(4096).mmap())
    def pick(name: str) -> None:
        reveal_type(guestmem.Kvm(name))
""")


def test_kvm_is_typed_precisely(tmp_path):
    script = tmp_path / "user.py"
    script.write_text(SNIPPET)
    out, err, status = api.run(["--strict", "--no-incremental", str(script)])
    revealed = [line.split("Revealed type is ")[1] for line in out.splitlines()
                if "Revealed type is" in line]
    assert revealed == ['"guestmem.model.kvm.Kvm"', '"guestmem.host.kvm.Kvm"',
                        '"guestmem.model.process.Mapping"', '"guestmem.api.Kvm"'], out + err
