"""Write the hostile-input corpus in ``corpus/`` without ever executing a payload.

Every file is assembled byte by byte (pickle opcodes, zip headers); nothing here unpickles,
imports a payload's target or calls ``torch.save``. Payloads that would run try to create the
file named by ``$SAFECKPT_CANARY`` (the tests point it at a temporary path and check that it
never appears). `CASES` is the corpus with what reading each file must raise; the threat list
it follows is ``torch_formats_and_pickle_threats.md`` §4.3/§4.5 (m01-m23) plus zip-structure cases.

Run: ``python tests/attacks/make_attacks.py`` (deterministic: the same bytes every time).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CMD = 'touch "$SAFECKPT_CANARY"'
PY = "open(__import__('os').environ['SAFECKPT_CANARY'], 'w').close()"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# -- pickle assembly --------------------------------------------------------------------------------

P2, P4, P5, STOP = b"\x80\x02", b"\x80\x04", b"\x80\x05", b"."


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def uni(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def short(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"\x8c" + bytes([len(b)]) + b


def num(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def call(fn: bytes, *args: bytes) -> bytes:
    return fn + tup(*args) + b"R"


def system(module: str = "posix") -> bytes:
    return call(glob(module, "system"), uni(CMD))


def storage_pid(key: str, numel: int, stype: str = "FloatStorage", legacy: bool = False) -> bytes:
    view = b"N" if legacy else b""  # legacy ids carry a sixth item, the (unused) view metadata
    return tup(uni("storage"), glob("torch", stype), uni(key), uni("cpu"), num(numel), view) + b"Q"


def tensor_v2(pid: bytes, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    hooks = call(glob("collections", "OrderedDict"))
    return call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        pid,
        num(offset),
        tup(*map(num, size)),
        tup(*map(num, stride)),
        b"\x89",
        hooks,
    )


def state_dict(**items: bytes) -> bytes:
    return b"}(" + b"".join(uni(k) + v for k, v in items.items()) + b"u"


def plain(value: int | dict[str, object]) -> bytes:
    """A benign protocol-2 pickle of an int or a flat dict of bools/ints (the legacy header pickles)."""
    if isinstance(value, int):
        return P2 + num(value) + STOP
    body = b"".join(
        uni(k) + (b"\x88" if v is True else b"\x89" if v is False else num(v) if isinstance(v, int) else plain_dict(v))
        for k, v in value.items()
    )  # type: ignore[arg-type]
    return P2 + b"}(" + body + b"u" + STOP


def plain_dict(d: dict[str, int]) -> bytes:
    return b"}(" + b"".join(uni(k) + num(v) for k, v in d.items()) + b"u"


SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def legacy(obj_pickle: bytes, keys: list[str], storages: list[bytes]) -> bytes:
    """A legacy (non-zip) torch file: magic, version, sys_info, object, key list, then storages."""
    key_list = P2 + b"](" + b"".join(uni(k) for k in keys) + b"e" + STOP
    return plain(LEGACY_MAGIC) + plain(1001) + plain(SYS_INFO) + obj_pickle + key_list + b"".join(storages)


# -- zip assembly (stored entries, torch-style 64-byte alignment) -----------------------------------


@dataclass
class Entry:
    name: str
    data: bytes
    method: int = 0
    stored: bytes | None = None  # bytes written (compressed); defaults to data
    local_name: str | None = None
    flags: int = 0
    size: int | None = None  # declared uncompressed size (central), default len(data)


@dataclass
class Ghost:
    """A central-directory entry for bytes written elsewhere (inside another entry's data)."""

    name: str
    local_at: int
    size: int


@dataclass
class Zip:
    entries: list[Entry]
    align: int = 64
    zip64: bool = False
    ghosts: list[Ghost] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)  # name -> data offset, filled by build

    def build(self) -> bytes:
        out = bytearray()
        central = bytearray()
        for e in self.entries:
            stored = e.data if e.stored is None else e.stored
            size = len(e.data) if e.size is None else e.size
            lname = (e.local_name or e.name).encode()
            at = len(out)
            extra = b""
            if self.zip64:
                extra += struct.pack("<HHQQ", 1, 16, size, len(stored))
            base = at + 30 + len(lname) + len(extra) + 4
            pad = (-base) % self.align
            extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            crc = zlib.crc32(e.data)
            sizes = (0xFFFFFFFF, 0xFFFFFFFF) if self.zip64 else (len(stored), size)
            out += struct.pack(
                "<4sHHHHHIIIHH",
                b"PK\x03\x04",
                45 if self.zip64 else 20,
                e.flags,
                e.method,
                0,
                0x21,
                crc,
                *sizes,
                len(lname),
                len(extra),
            )
            out += lname + extra
            self.offsets[e.name] = len(out)
            out += stored
            central += self._central(e.name.encode(), e.flags, e.method, crc, len(stored), size, at)
        for g in self.ghosts:
            central += self._central(g.name.encode(), 0, 0, 0, g.size, g.size, g.local_at)
        count = len(self.entries) + len(self.ghosts)
        cd_at = len(out)
        out += central
        if self.zip64:
            eocd64_at = len(out)
            out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(central), cd_at)
            out += struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64_at, 1)
            out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        else:
            out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(central), cd_at, 0)
        return bytes(out)

    def _central(self, name: bytes, flags: int, method: int, crc: int, csize: int, usize: int, at: int) -> bytes:
        extra = b""
        if self.zip64:
            extra = struct.pack("<HHQQQ", 1, 24, usize, csize, at)
            usize = csize = at = 0xFFFFFFFF
        head = struct.pack(
            "<4sHHHHHHIIIHHHHHII",
            b"PK\x01\x02",
            45,
            45 if self.zip64 else 20,
            flags,
            method,
            0,
            0x21,
            crc,
            csize,
            usize,
            len(name),
            len(extra),
            0,
            0,
            0,
            0,
            at,
        )
        return head + name + extra


def torch_zip(
    data_pkl: bytes,
    storages: dict[str, bytes] | None = None,
    prefix: str = "archive",
    extra: list[Entry] | None = None,
    **kw: object,
) -> Zip:
    """The records ``torch.save`` writes, around the given ``data.pkl``."""
    entries = [Entry(f"{prefix}/data.pkl", data_pkl), Entry(f"{prefix}/byteorder", b"little")]
    entries += [Entry(f"{prefix}/data/{k}", v) for k, v in (storages or {}).items()]
    entries += extra or []
    entries += [Entry(f"{prefix}/version", b"3\n"), Entry(f"{prefix}/.data/serialization_id", b"0" * 40)]
    return Zip(entries, **kw)  # type: ignore[arg-type]


FOUR_FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def benign_pkl() -> bytes:
    return P2 + state_dict(w=tensor_v2(storage_pid("0", 4), 0, (4,), (1,))) + STOP


def benign_zip(**kw: object) -> bytes:
    return torch_zip(benign_pkl(), {"0": FOUR_FLOATS}, **kw).build()  # type: ignore[arg-type]


# -- the cases -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    file: str
    error: str  # "unsafe" or "corrupt"
    match: str  # a regex the message must match (the cause); the file name is checked separately
    runs: bool = False  # would a plain pickle/torch.load run the payload (proved in a subprocess test)
    what: str = ""


def _cases() -> list[tuple[Case, bytes]]:
    c: list[tuple[Case, bytes]] = []

    def add(file: str, error: str, match: str, data: bytes, *, runs: bool = False, what: str = "") -> None:
        c.append((Case(file, error, match, runs, what), data))

    # code execution through globals
    add(
        "m01_posix_system.pkl",
        "unsafe",
        r"'posix\.system'",
        P2 + system() + STOP,
        runs=True,
        what="raw pickle REDUCE posix.system",
    )
    add(
        "m02_system_in_zip.pt",
        "unsafe",
        r"'posix\.system'",
        torch_zip(P2 + state_dict(x=system()) + STOP).build(),
        runs=True,
        what="posix.system inside a torch zip",
    )
    memo = (
        P4
        + short("builtins")
        + b"\x94"
        + short("eval")
        + b"\x94"
        + b"00"
        + b"h\x00h\x01\x93"
        + short(PY)
        + b"\x85R"
        + STOP
    )
    add(
        "m03_eval_stack_global_memo.pkl",
        "unsafe",
        r"'builtins\.eval'",
        memo,
        runs=True,
        what="builtins.eval via STACK_GLOBAL fed from the memo",
    )
    getattr_chain = (
        P2
        + call(
            call(glob("builtins", "getattr"), call(glob("builtins", "__import__"), uni("os")), uni("system")), uni(CMD)
        )
        + STOP
    )
    add(
        "m04_getattr_import_chain.pkl",
        "unsafe",
        r"'builtins\.getattr'",
        getattr_chain,
        runs=True,
        what="getattr(__import__('os'), 'system')",
    )
    inner = legacy(P2 + system() + STOP, [], [])
    nested = torch_zip(
        P2
        + state_dict(x=call(glob("torch.storage", "_load_from_bytes"), b"B" + struct.pack("<I", len(inner)) + inner))
        + STOP
    ).build()
    add(
        "m05_nested_load_from_bytes.pt",
        "unsafe",
        r"'torch\.storage\._load_from_bytes'",
        nested,
        runs=True,
        what="nested torch.load via _load_from_bytes",
    )
    add(
        "m06_inst.pkl",
        "unsafe",
        r"'os\.system'",
        P2 + b"(" + b"S'" + CMD.encode() + b"'\n" + b"ios\nsystem\n" + STOP,
        runs=True,
        what="INST os.system",
    )
    add(
        "m07_obj.pkl",
        "unsafe",
        r"OBJ",
        P2 + b"(" + glob("posix", "system") + uni(CMD) + b"o" + STOP,
        runs=True,
        what="OBJ posix.system",
    )
    add(
        "m08_ext1.pkl",
        "unsafe",
        r"EXT1",
        P2 + b"\x82\x01" + tup(uni(CMD)) + b"R" + STOP,
        what="EXT1: a class from the copyreg registry, no GLOBAL",
    )
    add(
        "m09_setitems_on_list.pkl",
        "unsafe",
        r"SETITEM.*list|list.*SETITEM",
        P2 + b"](" + num(0) + num(1) + b"u" + STOP,
        what="SETITEMS on a list (CVE-2026-24747 class)",
    )
    big = P2 + state_dict(w=tensor_v2(storage_pid("0", 1_000_000), 0, (1_000_000,), (1,))) + STOP
    add(
        "m10_storage_size_mismatch.pt",
        "corrupt",
        r"storage 0: declared 4000000 bytes.*16",
        torch_zip(big, {"0": FOUR_FLOATS}).build(),
        what="declared numel 1e6, record 16 bytes",
    )
    oob = P2 + state_dict(w=tensor_v2(storage_pid("0", 4), 2, (100,), (1,))) + STOP
    add(
        "m11_view_out_of_bounds.pt",
        "corrupt",
        r"view \[2, 102\) exceeds its storage of 4 elements",
        torch_zip(oob, {"0": FOUR_FLOATS}).build(),
        what="view offset 2, size 100 on 4 elements",
    )
    trav = torch_zip(
        benign_pkl(), {"0": FOUR_FLOATS}, extra=[Entry("archive/../../tmp/evil", b"x"), Entry("/etc/evil", b"x")]
    ).build()
    add(
        "m12_path_traversal.pt",
        "unsafe",
        r"suspicious zip entry name 'archive/\.\./\.\./tmp/evil'",
        trav,
        what="entry names with .. and absolute paths",
    )
    evil_pkl = P2 + state_dict(x=system()) + STOP
    dup = torch_zip(benign_pkl(), {"0": FOUR_FLOATS}, extra=[Entry("archive/data.pkl", evil_pkl)]).build()
    add(
        "m13_duplicate_data_pkl.pt",
        "unsafe",
        r"duplicate zip entry 'archive/data\.pkl'",
        dup,
        what="benign data.pkl first, evil one last (readers take the last)",
    )
    bomb_size = 64 << 20
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    stored = deflate.compress(b"\x00" * bomb_size) + deflate.flush()
    bomb_pkl = P2 + state_dict(w=tensor_v2(storage_pid("0", bomb_size // 4), 0, (bomb_size // 4,), (1,))) + STOP
    bomb = torch_zip(bomb_pkl, extra=[Entry("archive/data/0", b"", method=8, stored=stored, size=bomb_size)]).build()
    add(
        "m14_zip_bomb.pt",
        "corrupt",
        r"compressed \(method 8, \d+ bytes expanding to 67108864\)",
        bomb,
        what="a deflated 64 MiB storage",
    )
    add(
        "m15_pickle_zip_polyglot.pt",
        "unsafe",
        r"'posix\.system'",
        P2 + system() + STOP + benign_zip(),
        runs=True,
        what="a pickle at 0 with a valid torch zip appended",
    )
    ts = torch_zip(
        benign_pkl(),
        {"0": FOUR_FLOATS},
        extra=[
            Entry("archive/constants.pkl", P2 + b")" + STOP),
            Entry("archive/code/__torch__.py", b"def forward(self): ...\n"),
        ],
    ).build()
    add("m16_torchscript.pt", "corrupt", r"TorchScript archive whose data.pkl does not hold a module", ts, what="a TorchScript-looking archive without a module")
    persid = P2 + state_dict(x=tup(uni("module"), glob("posix", "system"), uni("0"), uni("cpu"), num(1)) + b"Q") + STOP
    add(
        "m17_persid_module.pt",
        "unsafe",
        r"'posix\.system'",
        torch_zip(persid).build(),
        what="BINPERSID ('module', posix.system, ...)",
    )
    add(
        "m18_trailing_pickle.pt",
        "corrupt",
        r"trailing data after the pickle's STOP",
        torch_zip(benign_pkl() + evil_pkl, {"0": FOUR_FLOATS}).build(),
        what="a second (evil) pickle after STOP in data.pkl",
    )
    bomb_memo = bytearray(P2 + b"Nq\x000")
    for level in range(1, 10):
        bomb_memo += b"(" + (b"h" + bytes([level - 1])) * 10 + b"lq" + bytes([level]) + (b"0" if level < 9 else b"")
    add(
        "m19_memo_expansion.pkl",
        "corrupt",
        r"expand to too many values",
        bytes(bomb_memo) + STOP,
        what="memo sharing: 238 bytes describing 10^9 leaf paths",
    )
    add(
        "m20_binunicode8_huge.pkl",
        "corrupt",
        r"needs 1152921504606846976 bytes",
        P4 + b"\x8d" + struct.pack("<Q", 1 << 60) + b"abc" + STOP,
        what="BINUNICODE8 declaring 2^60 bytes",
    )
    add(
        "m21_deep_nesting.pkl",
        "corrupt",
        r"nested more than 256 levels",
        P2 + b")" + b"\x85" * 30_000 + STOP,
        what="30 000 nested tuples",
    )
    add(
        "m21b_deep_marks.pkl",
        "corrupt",
        r"more than 10000 nested MARKs",
        P2 + b"(" * 20_000 + b"]" + b"l" * 20_000 + STOP,
        what="20 000 nested MARKs",
    )
    add("m22_next_buffer.pkl", "unsafe", r"NEXT_BUFFER", P5 + b"\x97" + STOP, what="protocol 5 out-of-band buffer")
    leg_obj = P2 + state_dict(w=tensor_v2(storage_pid("1", 4, legacy=True), 0, (4,), (1,)), x=system()) + STOP
    add(
        "m23_legacy_payload.pt",
        "unsafe",
        r"'posix\.system'",
        legacy(leg_obj, ["1"], [struct.pack("<q", 4) + FOUR_FLOATS]),
        runs=True,
        what="legacy file, payload in the 4th (object) pickle",
    )
    dotted = P4 + short("builtins") + short("print.__self__.eval") + b"\x93" + short(PY) + b"\x85R" + STOP
    add(
        "m24_dotted_global.pkl",
        "unsafe",
        r"'builtins\.print\.__self__\.eval'",
        dotted,
        runs=True,
        what="dotted STACK_GLOBAL name resolving to eval under protocol 4",
    )
    loads = (
        P2
        + call(glob("pickle", "loads"), b"B" + struct.pack("<I", len(P2 + system() + STOP)) + P2 + system() + STOP)
        + STOP
    )
    add(
        "m25_nested_pickle_loads.pkl",
        "unsafe",
        r"'pickle\.loads'",
        loads,
        runs=True,
        what="pickle.loads of an inner payload",
    )
    obj_dtype = call(glob("numpy", "dtype"), uni("O8"), b"\x89\x88")
    obj_array = (
        P2
        + call(glob("numpy._core.multiarray", "_reconstruct"), glob("numpy", "ndarray"), tup(num(0)), b"C\x01b")
        + tup(num(1), tup(num(1)), obj_dtype, b"\x89", b"]" + num(1) + b"a")
        + b"b"
        + STOP
    )
    add(
        "m26_numpy_object_array.pkl",
        "unsafe",
        r"numpy dtype 'O8' is not allowed",
        obj_array,
        what="a numpy object array (object arrays carry nested pickles)",
    )
    whole = benign_zip()
    add(
        "m27_truncated_central_directory.pt",
        "corrupt",
        r"end-of-central-directory",
        whole[:-30],
        what="archive cut inside the central directory",
    )
    huge = torch_zip(benign_pkl(), extra=[Entry("archive/data/0", FOUR_FLOATS, size=0xFFFFFFF0)]).build()
    add(
        "m28_huge_declared_size.pt",
        "corrupt",
        r"declares 4294967280 bytes",
        huge,
        what="a record declaring 4 GiB in a few-KB file",
    )
    host = Zip([Entry("archive/data.pkl", benign_pkl()), Entry("archive/data/9", b"\x00" * 200)])
    host.build()
    inner_at = host.offsets["archive/data/9"] + 16
    embedded = (
        struct.pack(
            "<4sHHHHHIIIHH",
            b"PK\x03\x04",
            20,
            0,
            0,
            0,
            0x21,
            zlib.crc32(FOUR_FLOATS),
            16,
            16,
            len(b"archive/data/0"),
            0,
        )
        + b"archive/data/0"
        + FOUR_FLOATS
    )
    host.entries[1] = Entry("archive/data/9", b"\x00" * 16 + embedded + b"\x00" * (184 - len(embedded)))
    host.ghosts = [Ghost("archive/data/0", inner_at, 16)]
    add("m29_overlapping_entries.pt", "corrupt", r"overlap", host.build(), what="one record's bytes inside another's")
    mismatch = torch_zip(
        benign_pkl(), {"0": FOUR_FLOATS}, extra=[Entry("archive/extra", b"x", local_name="archive/other")]
    ).build()
    add(
        "m30_local_central_mismatch.pt",
        "unsafe",
        r"local header disagrees",
        mismatch,
        what="local and central names differ",
    )
    enc = torch_zip(benign_pkl(), extra=[Entry("archive/data/0", FOUR_FLOATS, flags=1)]).build()
    add("m31_encrypted_entry.pt", "corrupt", r"encrypted", enc, what="an entry flagged as encrypted")
    add(
        "m32_data_after_eocd.pt",
        "corrupt",
        r"end-of-central-directory",
        benign_zip() + P2 + system() + STOP,
        what="a pickle appended after the end record",
    )
    eocd = bytearray(benign_zip())
    struct.pack_into("<HH", eocd, len(eocd) - 22 + 8, 0xFFFE, 0xFFFE)
    add(
        "m33_entry_count_lie.pt",
        "corrupt",
        r"65534 entries cannot fit",
        bytes(eocd),
        what="an end record claiming 65534 entries",
    )
    tar = bytearray(1024)
    tar[:8] = b"sys_info"
    tar[257:262] = b"ustar"
    add(
        "m34_legacy_tar.pt",
        "unsafe",
        r"legacy tar checkpoint",
        bytes(tar),
        what="the pre-0.1.10 tar format (torch extracts it)",
    )
    add(
        "m35_raw_trailing_payload.pkl",
        "corrupt",
        r"trailing data",
        P2 + num(1) + STOP + P2 + num(2) + STOP,
        what="bytes after STOP in a bare pickle",
    )
    od_attr = P2 + call(glob("collections", "OrderedDict")) + b"}(" + uni("keys") + num(1) + b"ub" + STOP
    add(
        "m36_build_odict_attribute.pkl",
        "corrupt",
        r"may only carry the attribute '_metadata'",
        od_attr,
        what="BUILD setting OrderedDict.keys",
    )
    str_storage = (
        P2
        + state_dict(
            w=call(
                glob("torch._utils", "_rebuild_tensor_v2"), uni("0"), num(0), tup(num(4)), tup(num(1)), b"\x89", b"N"
            )
        )
        + STOP
    )
    add(
        "m37_tensor_from_string.pt",
        "corrupt",
        r"rebuilt from a str",
        torch_zip(str_storage, {"0": FOUR_FLOATS}).build(),
        what="a tensor rebuilt from a string, not a storage",
    )
    add(
        "m38_long4_huge.pkl",
        "corrupt",
        r"1073741824 bytes",
        P2 + b"\x8b" + struct.pack("<i", 1 << 30) + b"\x01" * 8 + STOP,
        what="LONG4 declaring a 1 GiB integer",
    )
    add("m39_protocol_6.pkl", "corrupt", r"pickle protocol 6", b"\x80\x02N0\x80\x06N" + STOP, what="a PROTO 6 opcode")
    add("m40_append_to_dict.pkl", "unsafe", r"APPEND", P2 + b"}" + num(1) + b"a" + STOP, what="APPEND on a dict")
    add(
        "m41_persid_in_bare_pickle.pkl",
        "unsafe",
        r"persistent id",
        P2 + uni("x") + b"Q" + STOP,
        what="a persistent id where no storages exist",
    )
    redecl = (
        P2
        + state_dict(a=tensor_v2(storage_pid("0", 4), 0, (4,), (1,)), b=tensor_v2(storage_pid("0", 2), 0, (2,), (1,)))
        + STOP
    )
    add(
        "m42_storage_redeclared.pt",
        "corrupt",
        r"declared twice",
        torch_zip(redecl, {"0": FOUR_FLOATS}).build(),
        what="one storage declared with two sizes",
    )
    leg_count = P2 + state_dict(w=tensor_v2(storage_pid("1", 4, legacy=True), 0, (4,), (1,))) + STOP
    add(
        "m43_legacy_count_mismatch.pt",
        "corrupt",
        r"holds 1000 elements, the pickle declared 4",
        legacy(leg_count, ["1"], [struct.pack("<q", 1000) + FOUR_FLOATS]),
        what="legacy storage header disagrees with the pickle",
    )
    add(
        "m44_subprocess_getoutput.pkl",
        "unsafe",
        r"'subprocess\.getoutput'",
        P2 + call(glob("subprocess", "getoutput"), uni(CMD)) + STOP,
        runs=True,
        what="subprocess.getoutput(cmd)",
    )
    add(
        "m45_runpy.pkl",
        "unsafe",
        r"'runpy\._run_code'",
        P2 + call(glob("runpy", "_run_code"), uni(PY), b"}") + STOP,
        runs=True,
        what="runpy._run_code",
    )
    resolve = P2 + call(call(glob("pkgutil", "resolve_name"), uni("os:system")), uni(CMD)) + STOP
    add(
        "m46_pkgutil_resolve_name.pkl",
        "unsafe",
        r"'pkgutil\.resolve_name'",
        resolve,
        runs=True,
        what="pkgutil.resolve_name('os:system')",
    )
    partial = P2 + call(call(glob("functools", "partial"), glob("posix", "system"), uni(CMD))) + STOP
    add(
        "m47_functools_partial.pkl",
        "unsafe",
        r"'functools\.partial'",
        partial,
        runs=True,
        what="functools.partial(posix.system, cmd)()",
    )
    add(
        "m48_torch_load_global.pt",
        "unsafe",
        r"'torch\.load'",
        torch_zip(P2 + state_dict(x=call(glob("torch", "load"), uni("/tmp/other.pt"))) + STOP).build(),
        what="a nested torch.load of another file",
    )
    huge_view = P2 + state_dict(w=tensor_v2(storage_pid("0", 4), 0, (4, 4), (4, 1))) + STOP
    add(
        "m49_view_2d_out_of_bounds.pt",
        "corrupt",
        r"view \[0, 16\) exceeds its storage of 4 elements",
        torch_zip(huge_view, {"0": FOUR_FLOATS}).build(),
        what="a 4x4 view of 4 elements",
    )
    neg = P2 + state_dict(w=tensor_v2(storage_pid("0", 4), 0, (2,), (-1,))) + STOP
    add(
        "m50_negative_stride.pt",
        "corrupt",
        r"stride must be",
        torch_zip(neg, {"0": FOUR_FLOATS}).build(),
        what="a negative stride",
    )
    expanded = P2 + state_dict(w=tensor_v2(storage_pid("0", 4), 0, (1 << 40, 1 << 40), (0, 0))) + STOP
    add(
        "m51_huge_expanded_view.pt",
        "corrupt",
        r"beyond 4611686018427387904 elements",
        torch_zip(expanded, {"0": FOUR_FLOATS}).build(),
        what="a stride-0 view of 2^80 elements over 4 floats",
    )
    return c


CASES_AND_BYTES = _cases()
CASES = [case for case, _ in CASES_AND_BYTES]


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    for case, data in CASES_AND_BYTES:
        (CORPUS / case.file).write_bytes(data)
    (CORPUS / "m00_control.pt").write_bytes(benign_zip())
    (CORPUS / "m00_control_zip64.pt").write_bytes(benign_zip(zip64=True))
    print(f"{len(CASES)} hostile files (+2 controls) in {CORPUS}, {sum(len(d) for _, d in CASES_AND_BYTES)} bytes")


if __name__ == "__main__":
    main()
