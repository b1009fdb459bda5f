"""A TPM 2.0 stand-in for QEMU's ``tpm-emulator`` backend that records every PCR extend.

The firmware computes every digest it measures and sends each one to the TPM with
TPM2_PCR_Extend, so the ordered list of (PCR, SHA-384 digest) pairs a TPM receives is the
firmware's own record of what it measured: the same digests its event log would hold.
This recorder answers just enough of the TPM 2.0 command set for OVMF's Tcg2 drivers
(Startup, SelfTest, GetCapability, PCR_Extend, PCR_Read, GetRandom) with one active bank,
SHA-384, and speaks the control protocol of swtpm's UnixIO socket (big-endian command
codes; the data channel arrives as a file descriptor with CMD_SET_DATAFD).

Protocol facts from swtpm's ``swtpm_ioctls(3)`` and QEMU's backends/tpm; command and
structure layouts from the TCG TPM 2.0 Library specification, part 2 and 3.
"""

import hashlib
import os
import socket
import struct
import threading

# Control commands (swtpm_ioctls) and the capability bits QEMU requires for a TPM 2.
CMD_GET_CAPABILITY, CMD_INIT, CMD_SHUTDOWN, CMD_GET_TPMESTABLISHED, CMD_SET_LOCALITY = 1, 2, 3, 4, 5
CMD_CANCEL_TPM_CMD, CMD_RESET_TPMESTABLISHED, CMD_STOP = 9, 11, 14
CMD_SET_DATAFD, CMD_SET_BUFFERSIZE = 16, 17
CAPS = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 7) | (1 << 10) | (1 << 12) | (1 << 13)
# Request payload length and response length of each control command, in bytes.
CONTROL_SIZES = {
    CMD_GET_CAPABILITY: (0, None), CMD_INIT: (4, 4), CMD_SHUTDOWN: (0, 4), CMD_GET_TPMESTABLISHED: (0, 8),
    CMD_SET_LOCALITY: (4, 4), CMD_CANCEL_TPM_CMD: (0, 4), CMD_RESET_TPMESTABLISHED: (4, 4), CMD_STOP: (0, 4),
    CMD_SET_DATAFD: (0, 4), CMD_SET_BUFFERSIZE: (4, 16),
}

TPM_ST_NO_SESSIONS, TPM_ST_SESSIONS = 0x8001, 0x8002
TPM_RC_SUCCESS, TPM_RC_COMMAND_CODE, TPM_RC_INITIALIZE = 0, 0x143, 0x100
TPM_CC_STARTUP, TPM_CC_SELF_TEST, TPM_CC_GET_CAPABILITY = 0x144, 0x143, 0x17A
TPM_CC_PCR_EXTEND, TPM_CC_PCR_READ, TPM_CC_GET_RANDOM = 0x182, 0x17E, 0x17B
TPM_CAP_ALGS, TPM_CAP_COMMANDS, TPM_CAP_PCRS, TPM_CAP_TPM_PROPERTIES = 0, 2, 5, 6
TPM_ALG_SHA1, TPM_ALG_SHA256, TPM_ALG_SHA384, TPM_ALG_SHA512 = 0x0004, 0x000B, 0x000C, 0x000D
DIGEST_SIZES = {TPM_ALG_SHA1: 20, TPM_ALG_SHA256: 32, TPM_ALG_SHA384: 48, TPM_ALG_SHA512: 64}
PCR_COUNT = 24
BUFFER_SIZE = 4096
PROPERTIES = {
    0x100: 0x322E3000,   # TPM_PT_FAMILY_INDICATOR "2.0"
    0x105: 0x54455354,   # TPM_PT_MANUFACTURER "TEST"
    0x10B: 0x00010000,   # TPM_PT_FIRMWARE_VERSION_1
    0x10C: 0,            # TPM_PT_FIRMWARE_VERSION_2
    0x10D: 1024,         # TPM_PT_INPUT_BUFFER
    0x112: PCR_COUNT,    # TPM_PT_PCR_COUNT
    0x113: 3,            # TPM_PT_PCR_SELECT_MIN
    0x11E: BUFFER_SIZE,  # TPM_PT_MAX_COMMAND_SIZE
    0x11F: BUFFER_SIZE,  # TPM_PT_MAX_RESPONSE_SIZE
    0x120: 64,           # TPM_PT_MAX_DIGEST
}
SUPPORTED_COMMANDS = (TPM_CC_SELF_TEST, TPM_CC_STARTUP, TPM_CC_GET_CAPABILITY, TPM_CC_GET_RANDOM,
                      TPM_CC_PCR_READ, TPM_CC_PCR_EXTEND)


class TpmRecorder:
    """Serve one QEMU on a control socket at ``path``; ``extends`` lists (pcr, sha384 hex) in order."""

    def __init__(self, path: str):
        self.path = path
        self.extends = []
        self.commands = []
        self.pcrs = [bytes(48) for _ in range(PCR_COUNT)]
        self.changed = threading.Condition()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(1)
        self._threads = []
        self._closed = False

    def start(self):
        thread = threading.Thread(target=self._serve_control, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def close(self):
        self._closed = True
        try:
            self._server.close()
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)

    def wait_for(self, predicate, timeout: float) -> bool:
        """Block until ``predicate(extends)`` holds or ``timeout`` seconds pass."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.extends), timeout=timeout)

    # -- control channel -------------------------------------------------------------------

    def _serve_control(self):
        try:
            conn, _ = self._server.accept()
        except OSError:
            return
        with conn:
            while not self._closed:
                head, fds = self._recv_exact_with_fds(conn, 4)
                if head is None:
                    return
                (command,) = struct.unpack(">I", head)
                request_size, _ = CONTROL_SIZES.get(command, (0, 4))
                payload = self._recv_exact(conn, request_size) if request_size else b""
                if payload is None:
                    return
                try:
                    conn.sendall(self._control(command, payload, fds))
                except OSError:
                    return

    def _control(self, command, payload, fds) -> bytes:
        if command == CMD_GET_CAPABILITY:
            return struct.pack(">Q", CAPS)
        if command == CMD_SET_DATAFD:
            data = socket.socket(fileno=fds[0])
            thread = threading.Thread(target=self._serve_data, args=(data,), daemon=True)
            thread.start()
            self._threads.append(thread)
            return struct.pack(">I", 0)
        if command == CMD_GET_TPMESTABLISHED:
            return struct.pack(">IB3x", 0, 0)
        if command == CMD_SET_BUFFERSIZE:
            return struct.pack(">IIII", 0, BUFFER_SIZE, BUFFER_SIZE, BUFFER_SIZE)
        if command in CONTROL_SIZES:
            return struct.pack(">I", 0)
        return struct.pack(">I", 0xA)  # TPM_BAD_ORDINAL-style failure for anything unknown

    @staticmethod
    def _recv_exact(conn, size):
        data = b""
        while len(data) < size:
            try:
                chunk = conn.recv(size - len(data))
            except OSError:  # QEMU was killed: the boot is over
                return None
            if not chunk:
                return None
            data += chunk
        return data

    @staticmethod
    def _recv_exact_with_fds(conn, size):
        data, fds = b"", []
        while len(data) < size:
            try:
                chunk, new_fds, _, _ = socket.recv_fds(conn, size - len(data), 4)
            except OSError:
                return None, []
            if not chunk:
                return None, []
            data += chunk
            fds += new_fds
        return data, fds

    # -- data channel: TPM 2.0 commands ----------------------------------------------------

    def _serve_data(self, conn):
        with conn:
            while True:
                header = self._recv_exact(conn, 10)
                if header is None:
                    return
                tag, size, code = struct.unpack(">HII", header)
                body = self._recv_exact(conn, size - 10) if size > 10 else b""
                if body is None:
                    return
                self.commands.append(code)
                try:
                    conn.sendall(self._execute(tag, code, body))
                except OSError:
                    return

    def _execute(self, tag, code, body) -> bytes:
        if tag not in (TPM_ST_NO_SESSIONS, TPM_ST_SESSIONS):
            # A TPM 1.2 probe: answer in TPM 1.2 form (TPM_TAG_RSP_COMMAND, TPM_BADTAG).
            return struct.pack(">HII", 0xC4, 10, 0x1E)
        if code in (TPM_CC_STARTUP, TPM_CC_SELF_TEST):
            return _response(TPM_ST_NO_SESSIONS, TPM_RC_SUCCESS)
        if code == TPM_CC_GET_CAPABILITY:
            capability, prop, count = struct.unpack(">III", body[:12])
            return _response(TPM_ST_NO_SESSIONS, TPM_RC_SUCCESS, _capability(capability, prop, count))
        if code == TPM_CC_GET_RANDOM:
            (count,) = struct.unpack(">H", body[:2])
            count = min(count, 48)
            return _response(TPM_ST_NO_SESSIONS, TPM_RC_SUCCESS, struct.pack(">H", count) + bytes(count))
        if code == TPM_CC_PCR_EXTEND:
            return self._extend(body)
        if code == TPM_CC_PCR_READ:
            return self._read(body)
        return _response(TPM_ST_NO_SESSIONS, TPM_RC_COMMAND_CODE)

    def _extend(self, body) -> bytes:
        (pcr,) = struct.unpack(">I", body[:4])
        (auth_size,) = struct.unpack(">I", body[4:8])
        offset = 8 + auth_size
        (count,) = struct.unpack(">I", body[offset:offset + 4])
        offset += 4
        for _ in range(count):
            (alg,) = struct.unpack(">H", body[offset:offset + 2])
            size = DIGEST_SIZES[alg]
            digest = body[offset + 2:offset + 2 + size]
            offset += 2 + size
            if alg == TPM_ALG_SHA384 and pcr < PCR_COUNT:
                with self.changed:
                    self.pcrs[pcr] = hashlib.sha384(self.pcrs[pcr] + digest).digest()
                    self.extends.append((pcr, digest.hex()))
                    self.changed.notify_all()
        # parameterSize 0, then one password session response: empty nonce, attributes, empty hmac.
        return _response(TPM_ST_SESSIONS, TPM_RC_SUCCESS, struct.pack(">IHBH", 0, 0, 1, 0))

    def _read(self, body) -> bytes:
        (count,) = struct.unpack(">I", body[:4])
        selected = []
        offset = 4
        for _ in range(count):
            alg, size = struct.unpack(">HB", body[offset:offset + 3])
            mask = int.from_bytes(body[offset + 3:offset + 3 + size], "little")
            offset += 3 + size
            if alg == TPM_ALG_SHA384:
                selected += [i for i in range(PCR_COUNT) if mask >> i & 1][:8]
        mask = sum(1 << i for i in selected)
        out = struct.pack(">I", 0)  # pcrUpdateCounter
        out += struct.pack(">IHB", 1, TPM_ALG_SHA384, 3) + mask.to_bytes(3, "little")
        out += struct.pack(">I", len(selected)) + b"".join(struct.pack(">H", 48) + self.pcrs[i] for i in selected)
        return _response(TPM_ST_NO_SESSIONS, TPM_RC_SUCCESS, out)


def _response(tag, code, params=b"") -> bytes:
    return struct.pack(">HII", tag, 10 + len(params), code) + params


def _capability(capability, prop, count) -> bytes:
    """TPMI_YES_NO moreData, then TPMS_CAPABILITY_DATA for one capability."""
    if capability == TPM_CAP_PCRS:
        banks = [(TPM_ALG_SHA384, 0xFFFFFF)]
        data = struct.pack(">I", len(banks))
        data += b"".join(struct.pack(">HB", alg, 3) + mask.to_bytes(3, "little") for alg, mask in banks)
    elif capability == TPM_CAP_TPM_PROPERTIES:
        wanted = [p for p in sorted(PROPERTIES) if p >= prop][:max(count, 1)]
        if not wanted or wanted[0] != prop:
            wanted = [prop] + wanted[:max(count, 1) - 1]
        data = struct.pack(">I", len(wanted)) + b"".join(struct.pack(">II", p, PROPERTIES.get(p, 0)) for p in wanted)
    elif capability == TPM_CAP_ALGS:
        algs = [a for a in sorted(DIGEST_SIZES) if a >= prop][:count]
        data = struct.pack(">I", len(algs)) + b"".join(struct.pack(">HI", a, 0x4) for a in algs)
    elif capability == TPM_CAP_COMMANDS:
        codes = [c for c in sorted(SUPPORTED_COMMANDS) if c >= prop][:count]
        data = struct.pack(">I", len(codes)) + b"".join(struct.pack(">I", c) for c in codes)
    else:
        data = struct.pack(">I", 0)
    return struct.pack(">BI", 0, capability) + data
