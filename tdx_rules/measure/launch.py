"""How a TD is launched, per QEMU generation, and the TD attributes that command line asks for.

Two generations of QEMU start TDX guests, with the same ``tdx-guest`` object and
different spellings around it:

- Canonical's TDX build of QEMU 8.2 (and its later 9.x builds with the TDX patches), as
  Canonical documents it in canonical/tdx ``guest-tools/direct-boot/boot_direct.sh`` (direct
  kernel boot) and ``guest-tools/run_td``: ``-object '{"qom-type":"tdx-guest","id":"tdx",
  "quote-generation-socket":{"type":"vsock","cid":"2","port":"4050"}}'`` with
  ``-machine q35,kernel_irqchip=split,confidential-guest-support=tdx,hpet=off`` and
  ``-cpu host``;
- upstream QEMU, which carries TDX from 10.1 on, as ``docs/system/i386/tdx.rst`` documents it
  (``-object tdx-guest,id=tdx0``, ``-machine ...,confidential-guest-support=tdx0``,
  ``-cpu host``, kernel-irqchip split) with the properties of ``TdxGuestProperties`` in
  ``qapi/qom.json``: ``sept-ve-disable`` (bool, TD attribute bit 28) and
  ``quote-generation-socket`` (a SocketAddress: the host's Quote Generation Service, without
  which the guest cannot obtain a quote).

On top of both, the scripts ask for exactly one TD attribute: ``sept-ve-disable`` on (Linux TDX
guests need it). QEMU adds PKS (bit 30) when the CPU model has ``pks`` and PERFMON (bit 63)
when it has a PMU (target/i386/kvm/tdx.c, setup_td_guest_attributes), so ``-cpu host`` alone
would make the attributes depend on the host: ``-pks`` and ``pmu=off`` pin them, and the
manifest can state them for the verifier. DEBUG (bit 0) is never set.

XFAM (the XSAVE state the TD may use) is not a property of the object: QEMU derives it from the
CPU model's features, so with ``-cpu host`` it is the host's. The manifest says so and names the
bits every TD has (x87 and SSE are fixed to 1 by the TDX module).
"""

from dataclasses import dataclass

from tdx_rules.measure.profiles import parse_qemu_version

SEPT_VE_DISABLE = 1 << 28
# TD attribute bits a verifier may meet, by name (MEASUREMENT-FACTS: TD attributes).
ATTRIBUTE_BITS = {0: "DEBUG", 28: "SEPT_VE_DISABLE", 29: "MIGRATABLE", 30: "PKS", 31: "KL", 63: "PERFMON"}
XFAM_FIXED1 = 0b11  # x87 and SSE

QGS_CID = 2      # the host (VMADDR_CID_HOST), where the Quote Generation Service listens
QGS_PORT = 4050  # its vsock port in Canonical's and Intel's setups


@dataclass(frozen=True)
class Launch:
    """The TD part of the QEMU command line of one QEMU generation."""

    generation: str     # "canonical-8.2" or "upstream-10.1"
    documented_in: str  # where that QEMU documents the syntax
    object_id: str      # id of the tdx-guest object
    machine: str        # the -machine value
    cpu: str            # the -cpu value
    td_attributes: int  # what the command line asks for


CANONICAL = Launch(
    generation="canonical-8.2",
    documented_in="canonical/tdx guest-tools/direct-boot/boot_direct.sh, guest-tools/run_td",
    object_id="tdx",
    machine="q35,kernel_irqchip=split,confidential-guest-support=tdx,hpet=off",
    cpu="host,-pks,pmu=off",
    td_attributes=SEPT_VE_DISABLE,
)
UPSTREAM = Launch(
    generation="upstream-10.1",
    documented_in="qemu docs/system/i386/tdx.rst, qapi/qom.json (TdxGuestProperties)",
    object_id="tdx0",
    machine="q35,kernel-irqchip=split,confidential-guest-support=tdx0,hpet=off",
    cpu="host,-pks,pmu=off",
    td_attributes=SEPT_VE_DISABLE,
)


def launch_for(qemu_version) -> Launch:
    """The launch syntax of a QEMU version: upstream from 10.1 on, else Canonical's TDX build."""
    return UPSTREAM if parse_qemu_version(qemu_version) >= (10, 1) else CANONICAL


def quote_hex(value: int) -> str:
    """A 64-bit field as its 8 bytes appear in a quote (little-endian), in lowercase hex."""
    return value.to_bytes(8, "little").hex()


def attribute_names(value: int) -> list:
    return [ATTRIBUTE_BITS.get(bit, f"bit {bit}") for bit in range(64) if value >> bit & 1]


def manifest_record(launch: Launch) -> dict:
    """What the manifest states about the launch, for the verifier."""
    return {
        "qemu_generation": launch.generation,
        "documented_in": launch.documented_in,
        "cpu": launch.cpu,
        "td_attributes": quote_hex(launch.td_attributes),
        "td_attributes_bits": attribute_names(launch.td_attributes),
        "xfam": {"source": "the host CPU (-cpu host): QEMU derives XFAM from the CPU model's features",
                 "fixed1": quote_hex(XFAM_FIXED1)},
        "quote_generation_socket": {"type": "vsock", "cid": QGS_CID, "port": QGS_PORT,
                                    "override": "QGS_CID, QGS_PORT (empty: none)"},
    }
