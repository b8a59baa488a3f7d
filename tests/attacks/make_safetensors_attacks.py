"""Build the malformed safetensors files and hostile HF index directories in ``safetensors/``.

    python tests/attacks/make_safetensors_attacks.py

s01-s14 are the cases of ``torch_formats_and_pickle_threats.md`` §4.6; s15-s23 add the ones
safetensors 0.8.0 gets wrong or that stress the parser; i01-i19 attack the HF index (§4.5 row 19).
Everything is built byte by byte (no exploit runs); every file is a few KB. Cases that cannot be
committed (a 100 MB sparse file, a FIFO, a symlink into /dev) are made at test time by
`make_runtime`. ``CASES`` is the table the test checks: for each case the exception expected from
``safeckpt.open`` and a regular expression its message must match.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "safetensors"
CANARY = Path("/tmp/safeckpt-canary-i19")  # the i19 payload would create this file


@dataclass(frozen=True)
class Case:
    name: str  # file or directory name under safetensors/
    error: str  # "corrupt", "unsafe" or "unknown" (expected from safeckpt.open)
    pattern: str  # regular expression the message must match (besides naming the file)
    stock_rejects: bool | None = None  # does safetensors 0.8.0's safe_open reject it (None: not a single file)


def st_file(header: bytes | str | dict | list, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file: u64 header length (or a lie), header bytes, data."""
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def t(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


F32x2 = struct.pack("<2f", 1.0, 2.0)

FILES: dict[str, bytes] = {
    "s01_header_longer_than_file.safetensors": st_file({"a": t("F32", [2], 0, 8)}, F32x2, length=1000),
    "s02_truncated_json.safetensors": st_file('{"a": {"dtype": "F32", "sha'),
    "s03_overlapping_offsets.safetensors": st_file(
        {"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, F32x2 + b"\0" * 4
    ),
    "s04_size_mismatch.safetensors": st_file({"a": t("F32", [2, 2], 0, 12)}, b"\0" * 12),
    "s05_header_over_100MB_declared.safetensors": st_file('{"__metadata__": {"k": "vvvv', length=100_000_001),
    "s06_offsets_past_eof.safetensors": st_file({"a": t("F32", [4], 0, 16)}, F32x2),
    "s07_unknown_dtype.safetensors": st_file({"a": t("F13", [2], 0, 8)}, F32x2),
    "s08_hole_before_first_tensor.safetensors": st_file({"a": t("F32", [1], 4, 8)}, F32x2),
    "s09_duplicate_key.safetensors": st_file(
        '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}',
        F32x2,
    ),
    "s10_negative_dim.safetensors": st_file({"a": t("F32", [-1], 0, 8)}, F32x2),
    "s11_metadata_value_not_string.safetensors": st_file({"__metadata__": {"x": 1}, "a": t("F32", [2], 0, 8)}, F32x2),
    "s12_header_not_an_object.safetensors": st_file("[]"),
    "s13_trailing_bytes.safetensors": st_file({"a": t("F32", [2], 0, 8)}, F32x2 + b"PK\x03\x04 polyglot"),
    "s14_shape_product_overflow.safetensors": st_file({"a": t("F32", [2**62, 2**62], 0, 8)}, F32x2),
    "s15_tensor_named_metadata.safetensors": st_file({"__metadata__": t("F32", [2], 0, 8)}, F32x2),
    "s16_metadata_nested_object.safetensors": st_file(
        {"__metadata__": {"x": {"y": "z"}}, "a": t("F32", [2], 0, 8)}, F32x2
    ),
    "s17_f4_odd_last_dim.safetensors": st_file({"a": t("F4", [3, 3], 0, 4)}, b"\0" * 4 + b"\0" * 0),
    "s18_nul_padded_header.safetensors": st_file(json.dumps({"a": t("F32", [2], 0, 8)}).encode() + b"\0" * 7, F32x2),
    "s19_not_utf8.safetensors": st_file(
        b'{"a\xff\xfe": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', F32x2
    ),
    "s20_unpaired_surrogate_name.safetensors": st_file(
        '{"a\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', F32x2
    ),
    "s21_nesting_bomb.safetensors": st_file('{"a": ' + "[" * 5000 + "]" * 5000 + "}"),
    "s22_empty_file.safetensors": b"",
    "s23_entry_not_an_object.safetensors": st_file({"a": [1, 2, 3]}),
}

CASES: list[Case] = [
    Case(
        "s01_header_longer_than_file.safetensors",
        "corrupt",
        r"declared header of 1000 bytes runs past the end of the file",
        True,
    ),
    Case("s02_truncated_json.safetensors", "corrupt", r"not valid JSON", True),
    Case(
        "s03_overlapping_offsets.safetensors",
        "corrupt",
        r"tensor 'b' starts at data offset 4, expected 8 \(hole or overlap\)",
        True,
    ),
    Case(
        "s04_size_mismatch.safetensors",
        "corrupt",
        r"tensor 'a': shape \[2, 2\] of F32 needs 16 bytes, data_offsets give 12",
        True,
    ),
    Case(
        "s05_header_over_100MB_declared.safetensors",
        "corrupt",
        r"declared header of 100000001 bytes exceeds the 100 MB limit",
        True,
    ),
    Case(
        "s06_offsets_past_eof.safetensors", "corrupt", r"tensor data ends at byte \d+ but the file has \d+ bytes", True
    ),
    Case("s07_unknown_dtype.safetensors", "corrupt", r"tensor 'a' has unknown dtype 'F13'; known: BOOL, .*F4", True),
    Case(
        "s08_hole_before_first_tensor.safetensors", "corrupt", r"tensor 'a' starts at data offset 4, expected 0", True
    ),
    Case("s09_duplicate_key.safetensors", "corrupt", r"duplicate key 'a'", False),
    Case("s10_negative_dim.safetensors", "corrupt", r"tensor 'a' has an invalid shape \[-1\]", True),
    Case("s11_metadata_value_not_string.safetensors", "corrupt", r"__metadata__ must map strings to strings", True),
    Case("s12_header_not_an_object.safetensors", "corrupt", r"must be a JSON object", True),
    Case(
        "s13_trailing_bytes.safetensors",
        "corrupt",
        r"tensor data ends at byte \d+ but the file has \d+ bytes \(truncated or trailing data\)",
        True,
    ),
    Case("s14_shape_product_overflow.safetensors", "corrupt", r"spans more than 2\*\*63-1 elements", True),
    Case("s15_tensor_named_metadata.safetensors", "corrupt", r"a tensor is named '__metadata__'", True),
    Case("s16_metadata_nested_object.safetensors", "corrupt", r"__metadata__ must map strings to strings", True),
    Case("s17_f4_odd_last_dim.safetensors", "corrupt", r"F4 needs an even last dimension", True),
    Case("s18_nul_padded_header.safetensors", "corrupt", r"not valid JSON \(Extra data", True),
    Case("s19_not_utf8.safetensors", "corrupt", r"not UTF-8", True),
    Case("s20_unpaired_surrogate_name.safetensors", "corrupt", r"unpaired surrogate", True),
    Case("s21_nesting_bomb.safetensors", "corrupt", r"not valid JSON", True),
    Case("s22_empty_file.safetensors", "unknown", r"not a checkpoint safeckpt can read", True),
    Case("s23_entry_not_an_object.safetensors", "corrupt", r"entry 'a' must be an object", True),
    Case("i01_parent_path", "corrupt", r"shard '\.\./outside\.safetensors' is not a bare file name.*refusing"),
    Case("i02_absolute_path", "corrupt", r"shard '/tmp/outside\.safetensors' is not a bare file name"),
    Case("i03_backslash_path", "corrupt", r"shard '\.\.\\\\outside\.safetensors' is not a bare file name"),
    Case("i04_windows_drive", "corrupt", r"shard 'C:outside\.safetensors' is not a bare file name"),
    Case(
        "i05_symlink_out",
        "corrupt",
        r"is a symlink to .*outside\.safetensors, outside the checkpoint directory; refusing",
    ),
    Case(
        "i06_tensor_missing_from_shard",
        "corrupt",
        r"maps tensor 'ghost' to model-00001-of-00001\.safetensors, which does not hold it",
    ),
    Case(
        "i07_tensor_in_two_shards",
        "corrupt",
        r"tensor 'a' is in two shards, model-00001-of-00002\.safetensors and model-00002-of-00002\.safetensors",
    ),
    Case("i08_index_not_json", "corrupt", r"the index is not valid JSON"),
    Case("i10_weight_map_not_strings", "corrupt", r"'weight_map' maps tensor names to shard file names"),
    Case("i11_bin_shard_in_safetensors_index", "corrupt", r"shard 'pytorch_model\.bin' does not end in \.safetensors"),
    Case("i12_duplicate_key_in_index", "corrupt", r"has the key 'a' twice"),
    Case("i13_shard_missing", "corrupt", r"shard 'model-00002-of-00002\.safetensors' does not exist"),
    Case("i15_shard_is_a_directory", "corrupt", r"is not a regular file"),
    Case("i16_index_not_an_object", "corrupt", r"an index must be a JSON object"),
    Case(
        "i17_malformed_shard",
        "corrupt",
        r"model-00001-of-00001\.safetensors: invalid safetensors header: tensor 'a': shape \[2, 2\]",
    ),
    Case("i18_bin_index_escape", "corrupt", r"shard '\.\./outside\.bin' is not a bare file name"),
    Case("i19_bin_shard_pickle_payload", "unsafe", r"global 'posix\.system'.*nothing was imported or run"),
]

# made by `make_runtime` at test time (cannot or should not be committed)
RUNTIME: list[Case] = [
    Case("r01_real_100MB_header", "corrupt", r"declared header of 100000001 bytes exceeds the 100 MB limit"),
    Case("r02_index_over_limit", "corrupt", r"an index is a JSON file of at most 64 MiB"),
    Case("r03_shard_is_a_fifo", "corrupt", r"is not a regular file"),
    Case("r04_symlink_to_dev_zero", "corrupt", r"is a symlink to /dev/zero, outside the checkpoint directory"),
    Case("r05_million_dim_shape", "corrupt", r"has 1000000 dimensions \(limit 64"),
]

GOOD = {"a": t("F32", [2], 0, 8)}


def index(weight_map: dict, metadata: dict | None = None) -> str:
    return json.dumps({"metadata": metadata or {"total_size": 8}, "weight_map": weight_map}, indent=2)


def hf_dir(
    directory: Path, index_text: str | bytes, shards: dict[str, bytes], name: str = "model.safetensors.index.json"
) -> None:
    directory.mkdir(parents=True)
    (directory / name).write_bytes(index_text if isinstance(index_text, bytes) else index_text.encode())
    for shard, content in shards.items():
        (directory / shard).write_bytes(content)


def evil_pickle() -> bytes:
    """A pickled dict whose value calls os.system on unpickling; built, never loaded."""

    class Payload:
        def __reduce__(self) -> tuple[Callable[..., int], tuple[str]]:
            return (os.system, (f"touch {CANARY}",))

    return pickle.dumps({"a": Payload()}, protocol=2)


def make(root: Path = CORPUS) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for name, content in FILES.items():
        (root / name).write_bytes(content)
    shard = st_file(GOOD, F32x2)
    (root / "outside.safetensors").write_bytes(shard)  # the valid target the escapes point at
    one = "model-00001-of-00001.safetensors"
    hf_dir(root / "i01_parent_path", index({"a": "../outside.safetensors"}), {})
    hf_dir(root / "i02_absolute_path", index({"a": "/tmp/outside.safetensors"}), {})
    hf_dir(root / "i03_backslash_path", index({"a": "..\\outside.safetensors"}), {})
    hf_dir(root / "i04_windows_drive", index({"a": "C:outside.safetensors"}), {})
    hf_dir(root / "i05_symlink_out", index({"a": one}), {})
    (root / "i05_symlink_out" / one).symlink_to(Path("..", "outside.safetensors"))
    hf_dir(root / "i06_tensor_missing_from_shard", index({"a": one, "ghost": one}), {one: shard})
    two = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    both = st_file({"a": t("F32", [1], 0, 4), "b": t("F32", [1], 4, 8)}, F32x2)
    hf_dir(root / "i07_tensor_in_two_shards", index({"a": two[0], "b": two[1]}), {two[0]: shard, two[1]: both})
    hf_dir(root / "i08_index_not_json", '{"weight_map": {"a": "model-00001-of-00001.safetensors"', {one: shard})
    hf_dir(root / "i10_weight_map_not_strings", index({"a": 1}), {one: shard})
    hf_dir(
        root / "i11_bin_shard_in_safetensors_index",
        index({"a": "pytorch_model.bin"}),
        {"pytorch_model.bin": evil_pickle()},
    )
    hf_dir(root / "i12_duplicate_key_in_index", f'{{"weight_map": {{"a": "{one}", "a": "{one}"}}}}', {one: shard})
    hf_dir(
        root / "i13_shard_missing",
        index({"a": two[0], "b": two[1]}),
        {two[0]: st_file({"a": t("F32", [2], 0, 8)}, F32x2)},
    )
    hf_dir(root / "i15_shard_is_a_directory", index({"a": one}), {})
    (root / "i15_shard_is_a_directory" / one).mkdir()
    (root / "i15_shard_is_a_directory" / one / "keep").write_bytes(b"")
    hf_dir(root / "i16_index_not_an_object", "[]", {one: shard})
    hf_dir(root / "i17_malformed_shard", index({"a": one}), {one: FILES["s04_size_mismatch.safetensors"]})
    hf_dir(root / "i18_bin_index_escape", index({"a": "../outside.bin"}), {}, name="pytorch_model.bin.index.json")
    hf_dir(
        root / "i19_bin_shard_pickle_payload",
        index({"a": "pytorch_model-00001-of-00001.bin"}),
        {"pytorch_model-00001-of-00001.bin": evil_pickle()},
        name="pytorch_model.bin.index.json",
    )


def make_runtime(root: Path) -> None:
    """The cases that are large, or are special files: built fresh (sparse where large)."""
    big = root / "r01_real_100MB_header"
    big.write_bytes(st_file('{"__metadata__": {"k": "', length=100_000_001))
    os.truncate(big, 8 + 100_000_001)  # a real, sparse, 100 MB header: only the cap stops it
    directory = root / "r02_index_over_limit"
    directory.mkdir()
    with open(directory / "model.safetensors.index.json", "wb") as f:
        f.write(b'{"weight_map": {')
    os.truncate(directory / "model.safetensors.index.json", (64 << 20) + 1)
    directory = root / "r03_shard_is_a_fifo"
    hf_dir(directory, index({"a": "model-00001-of-00001.safetensors"}), {})
    os.mkfifo(directory / "model-00001-of-00001.safetensors")  # opening it would block forever
    directory = root / "r04_symlink_to_dev_zero"
    hf_dir(directory, index({"a": "model-00001-of-00001.safetensors"}), {})
    (directory / "model-00001-of-00001.safetensors").symlink_to("/dev/zero")
    # a million-entry shape: a naive shape product is quadratic in the digits and never finishes
    (root / "r05_million_dim_shape").write_bytes(
        st_file(
            '{"a": {"dtype": "F32", "shape": [' + ",".join(["3"] * 1_000_000) + '], "data_offsets": [0, 8]}}', F32x2
        )
    )


if __name__ == "__main__":
    make()
