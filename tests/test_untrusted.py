"""Hostile and unlucky inputs (issue 12), in-process: branch files, stored configs, shape documents, linked node
values and interrupts. Each case names the finding it pins down; the server-side rows live in test_reliability.py and
the randomised layer in test_fuzz.py.

Memory bounds are asserted from a subprocess's peak RSS (VmHWM, reset before the measured work), never from
timings.
"""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import REPO
from painternet_core import checkpoint, shapes
from painternet_core.branch import PainterNetBranch
from painternet_core.checkpoint import load_branch, read_header, save_branch
from painternet_core.config import SD15_UNET, TINY_SD15_UNET, TINY_SDXL_UNET, PainterNetConfig
from painternet_core.errors import QUOTE_LIMIT, quote

ITEM = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "BOOL": 1}


def write_safetensors(path, tensors: dict[str, tuple[str, list[int], bytes]] | None = None,
                      metadata: dict[str, str] | None = None, header: bytes | None = None,
                      header_len_mod_256: int | None = None) -> None:
    """A safetensors file written by hand (the library pads headers to 8 bytes; the format itself does not), so a
    test can give the header any length, or raw bytes."""
    data = b""
    if header is None:
        entries: dict[str, object] = {}
        for name, (dtype, shape, raw) in (tensors or {}).items():
            entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
            data += raw
        meta = dict(metadata or {})
        if meta or header_len_mod_256 is not None:
            entries["__metadata__"] = meta
        header = json.dumps(entries).encode()
        if header_len_mod_256 is not None:
            meta["pad"] = ""
            entries["__metadata__"] = meta
            base = len(json.dumps(entries).encode())
            meta["pad"] = "x" * ((header_len_mod_256 - base) % 256)
            header = json.dumps(entries).encode()
            assert len(header) % 256 == header_len_mod_256
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header + data)


def tensor(dtype: str, shape: list[int], fill: float = 0.0) -> tuple[str, list[int], bytes]:
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                   "I8": torch.int8, "BOOL": torch.bool}[dtype]
    t = torch.full(shape, fill).to(torch_dtype)
    return dtype, shape, t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def config_file(path, config_json: str, tensors=None) -> str:
    write_safetensors(path, tensors or {"conv_in.weight": tensor("F32", [1])},
                      {"painternet_format": "1", "painternet_config": config_json})
    return str(path)


def tiny_config(**unet) -> dict:
    return json.loads(PainterNetConfig(family="sd15", unet=TINY_SD15_UNET).to_json()) | (
        {"unet": dict(TINY_SD15_UNET, **unet)} if unet else {})


@pytest.fixture(scope="module")
def tiny_branch(tmp_path_factory):
    """The tiny SD1.5 branch as the pack's own writer saves it: its header is 0x15480 bytes (low byte 0x80)."""
    torch.manual_seed(0)
    branch = PainterNetBranch(PainterNetConfig(family="sd15", unet=TINY_SD15_UNET))
    path = str(tmp_path_factory.mktemp("untrusted") / "tiny.safetensors")
    save_branch(path, branch.state_dict(), branch.config)
    return path, branch


# ------------------------------------------------------------------------------------- finding 1: file detection

def test_own_export_whose_header_length_ends_in_0x80_loads(tiny_branch):
    path, branch = tiny_branch
    with open(path, "rb") as fh:
        assert fh.read(1) == b"\x80", "the fixture must exercise the 0x80 low byte"
    state, config = load_branch(path)
    assert config == branch.config
    assert all(torch.equal(state[k], v) for k, v in branch.state_dict().items())


def test_every_header_length_modulo_256_is_read(tmp_path):
    from safetensors import safe_open

    values = tensor("F32", [3], 1.5)
    for residue in range(256):
        path = tmp_path / f"r{residue}.safetensors"
        write_safetensors(path, {"w": values}, {"k": "v"}, header_len_mod_256=residue)
        header = read_header(str(path))
        assert header.tensors["w"].shape == (3,) and header.metadata["k"] == "v"
        with safe_open(str(path), framework="pt") as fh:  # the library agrees the file is valid
            assert torch.equal(fh.get_tensor("w"), torch.full((3,), 1.5))


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".ckpt", ".pt", ""])
def test_pickle_and_zip_are_refused_by_their_signatures_whatever_the_suffix(tmp_path, suffix):
    torch.save({"w": torch.zeros(2)}, tmp_path / f"zip{suffix}")
    with pytest.raises(ValueError, match="is a zip .*never loaded"):
        load_branch(str(tmp_path / f"zip{suffix}"))
    torch.save({"w": torch.zeros(2)}, tmp_path / f"old{suffix}", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="is a pickle .*never loaded"):
        load_branch(str(tmp_path / f"old{suffix}"))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5, "zip"], ids=["pickle-2", "pickle-3", "pickle-4", "pickle-5", "zip"])
def test_refused_pickle_or_zip_is_named_and_the_hint_converts_it(tmp_path, protocol):
    """Every pickle protocol torch.save can write (2..5) and its zip are refused by signature with the whole message:
    the file, what it is, and a command which, run in a trusted process with IN/OUT filled in, turns that very file
    into a safetensors file of the same tensors (for protocols 4 and 5, which torch's weights-only unpickler cannot
    read, the message says so and the command run with weights_only=False, as it tells)."""
    path = str(tmp_path / "old.bin")
    if protocol == "zip":
        torch.save({"w": torch.arange(4.0)}, path)
    else:
        torch.save({"w": torch.arange(4.0)}, path, pickle_protocol=protocol, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError) as refused:
        load_branch(path)
    message = str(refused.value)
    kind = "zip" if protocol == "zip" else "pickle"
    prefix = (f"{quote(path)} is a {kind} (pickle/zip checkpoint), which is never loaded (it can run code); convert "
              "it once in a trusted environment with: python -c \"")
    assert message.startswith(prefix), message
    hint = message[len(prefix):]
    if protocol in (4, 5):
        note = (f'" (it is pickle protocol {protocol}, which torch\'s weights-only loader cannot read: only if you trust '
                "where the file came from, run that command with weights_only=False)")
        assert hint.endswith(note), message
        hint = hint[:-len(note)].replace("weights_only=True", "weights_only=False")
    else:
        assert hint.endswith('"'), message
        hint = hint[:-1]
    out = str(tmp_path / "converted.safetensors")
    code = hint.replace("'IN'", repr(path)).replace("'OUT.safetensors'", repr(out))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert read_header(out).tensors["w"].shape == (4,)
    assert torch.equal(checkpoint.read_tensors(out, ["w"])["w"], torch.arange(4.0))


def test_an_empty_zip_is_refused_as_a_zip(tmp_path):
    import zipfile

    path = str(tmp_path / "empty.safetensors")
    zipfile.ZipFile(path, "w").close()
    with open(path, "rb") as fh:
        assert fh.read(4) == b"PK\x05\x06"
    with pytest.raises(ValueError, match=r"^" + re.escape(f"{quote(path)} is a zip (pickle/zip checkpoint), which is "
                                                          "never loaded (it can run code); convert") + " .*\"$"):
        load_branch(path)


@pytest.mark.parametrize("head", [b"\x80\x06", b"\x80\x01", b"\x00\x03", b"\x41\x05", b"PK\x01\x02"])
def test_bytes_that_only_resemble_a_pickle_or_zip_are_not_called_one(tmp_path, head):
    """A protocol byte outside 2..5, a protocol byte without the PROTO opcode before it, or a zip record that does
    not start a zip: the file is called corrupt, not a pickle or zip."""
    data = head.ljust(32, b"\0")
    path = str(tmp_path / "odd.safetensors")
    with open(path, "wb") as fh:
        fh.write(data)
    (n,) = struct.unpack("<Q", data[:8])
    expected = (f"{quote(path)} is not a valid safetensors file (header length {n} does not fit the file size 32); it "
                "is corrupt or not safetensors: re-download or re-export it")
    with pytest.raises(ValueError, match=r"^" + re.escape(expected) + "$"):
        load_branch(path)


def test_safetensors_is_recognised_by_its_content_whatever_the_suffix(tiny_branch, tmp_path):
    """A valid branch named like a pickle (`.bin`, as some hubs name safetensors files) loads, in core and through the
    loader node, whose folder lists those suffixes."""
    import shutil

    from harness.comfy_helpers import pack_module

    path, branch = tiny_branch
    for name in ("branch.bin", "branch.ckpt", "branch.pt", "branch"):
        shutil.copy(path, tmp_path / name)
        state, config = load_branch(str(tmp_path / name))
        assert config == branch.config
        assert all(torch.equal(state[k], v) for k, v in branch.state_dict().items())
    painternet = pack_module("nodes.branch").load_painternet(str(tmp_path / "branch.bin"), "fp32")
    assert painternet.config == branch.config


# ------------------------------------------------------------------------------ finding 6: malformed headers

def _nested(depth: int) -> bytes:
    return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"


MALFORMED_HEADERS = [
    ("list-header", b"[]", "not a valid safetensors file"),
    ("not-json", b"{nope", "corrupt safetensors header"),
    ("deep-nesting", _nested(100_000), "corrupt safetensors header"),
    ("no-data-offsets", b'{"w": {"dtype": "F32", "shape": [1]}}', "data_offsets must be"),
    ("entry-not-object", b'{"w": 5}', "it is not an object"),
    ("unknown-dtype", b'{"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 4]}}', "unknown dtype"),
    ("negative-dim", b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "non-negative integers"),
    ("bool-dim", b'{"w": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', "non-negative integers"),
    ("size-mismatch", b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "does not match its shape"),
    ("offsets-reversed", b'{"w": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}', "data_offsets must be"),
    ("beyond-file", b'{"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}', "is truncated"),
    ("metadata-not-strings", b'{"__metadata__": {"a": 1}}', "malformed safetensors metadata"),
]


@pytest.mark.parametrize("case, header, message", MALFORMED_HEADERS, ids=[c[0] for c in MALFORMED_HEADERS])
def test_malformed_header_is_the_packs_value_error(tmp_path, case, header, message):
    path = tmp_path / f"{case}.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(ValueError, match=message) as refused:
        load_branch(str(path))
    assert len(str(refused.value)) < 4 * QUOTE_LIMIT + 400


def test_oversized_header_is_refused_before_parsing_and_tensor_count_while_parsing(tmp_path):
    big = tmp_path / "big.safetensors"
    header = b'{"__metadata__": {"pad": "' + b"x" * (checkpoint.MAX_HEADER_BYTES + 10) + b'"}}'
    with open(big, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match="over the .*-byte limit"):
        load_branch(str(big))
    many = tmp_path / "many.safetensors"
    write_safetensors(many, {f"t{i}": ("F32", [0], b"") for i in range(checkpoint.MAX_TENSORS + 1)})
    with pytest.raises(ValueError, match=f"more than the {checkpoint.MAX_TENSORS}"):
        load_branch(str(many))
    # The count stops the parser: entries past the bound are never read, so the broken JSON at the end of this
    # header is never reached (a parse of the whole header would report it as corrupt instead).
    entries = b", ".join(b'"t%d": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}' % i
                         for i in range(checkpoint.MAX_TENSORS + 3))
    write_safetensors(many, header=b"{" + entries + b', "broken": [}')
    with pytest.raises(ValueError, match=f"more than the {checkpoint.MAX_TENSORS}"):
        load_branch(str(many))


# -------------------------------------------------------------------------- findings 2 and 6: stored configs

BAD_CONFIGS = [
    ("config-5", "5", "must be a JSON object"),
    ("config-list", "[]", "must be a JSON object"),
    ("config-deep", "[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ("missing-unet", json.dumps({"family": "sd15"}), "has no \\['unet'\\]"),
    ("channels-string", json.dumps(tiny_config(block_out_channels="abc")), "block_out_channels='abc' must be a list"),
    ("channels-empty", json.dumps(tiny_config(block_out_channels=[])), "must be a list of 1 to"),
    ("channels-zero", json.dumps(tiny_config(block_out_channels=[0, 0, 0, 0])), r"block_out_channels\[0\]=0"),
    ("channels-nan", json.dumps(tiny_config(block_out_channels=[float("nan")] * 4)), r"block_out_channels\[0\]=nan"),
    ("channels-huge", json.dumps(tiny_config(block_out_channels=[10**6] * 4)), r"in \[1, 4096\]"),
    ("layers-4000", json.dumps(tiny_config(layers_per_block=4000)), r"layers_per_block=4000 must be an integer in"),
    ("depth-huge", json.dumps(tiny_config(transformer_layers_per_block=10**9)), "transformer_layers_per_block"),
    ("heads-zero", json.dumps(tiny_config(attention_head_dim=0)), "attention_head_dim=0"),
    ("types-wrong", json.dumps(tiny_config(down_block_types=["Nope"] * 4)), "down_block_types"),
    ("unknown-unet-key", json.dumps(tiny_config(sample_size=64)), "unknown keys"),
    ("masked-fill-string", json.dumps(tiny_config() | {"masked_fill": "x"}), "masked_fill='x'"),
    ("flag-not-bool", json.dumps(tiny_config() | {"cross_attention": "yes"}), "cross_attention='yes'"),
    ("source-format", json.dumps(tiny_config() | {"source_format": 3}), "source_format=3"),
]


HUGE_CONFIG_INTS = [("masked_fill", tiny_config() | {"masked_fill": 10**400}),
                    ("unet.norm_eps", tiny_config(norm_eps=10**400)),
                    ("unet.freq_shift", tiny_config(freq_shift=10**400))]


@pytest.mark.parametrize("field, config", HUGE_CONFIG_INTS, ids=[c[0] for c in HUGE_CONFIG_INTS])
def test_401_digit_config_ints_name_the_file_and_field(tmp_path, field, config):
    """Issue 21 item 5: a 401-digit int in a branch file's config raised a raw OverflowError naming nothing."""
    path = config_file(tmp_path / "huge-int.safetensors", json.dumps(config))
    with pytest.raises(ValueError) as err:
        checkpoint.inspect_branch(path)
    message = str(err.value)
    assert "huge-int.safetensors" in message and f"painternet_config {field}=1000" in message, message
    assert len(message) < 800  # the 401 digits are quoted cut to 200 characters


def test_config_metadata_refusals_are_whole_messages_naming_the_text_and_the_fix():
    """The stored JSON is quoted (cut) and the message says what to do: the file is damaged, or the pack is older."""
    good = tiny_config()
    cases = [
        ("nope", r"metadata is not valid JSON \('Expecting value: line 1 column 1 \(char 0\)'\); the file is damaged"),
        ("[1, 2]", r"metadata must be a JSON object, got \[1, 2\]; the file is damaged"),
        (json.dumps(good | {"zoom": 1, "alpha": 2}),
         r"has unknown fields \['alpha', 'zoom'\]; the file was written by a newer PainterNet, update the pack"),
        (json.dumps({"masked_fill": 0.0}), r"has no \['family', 'unet'\]; the file is damaged, re-export it"),
    ]
    for text, message in cases:
        with pytest.raises(ValueError, match=rf"^painternet_config {message}$"):
            PainterNetConfig.from_json(text)
    assert PainterNetConfig.from_json(json.dumps({"family": "sd15", "unet": TINY_SD15_UNET})) == \
        PainterNetConfig(family="sd15", unet=TINY_SD15_UNET)


@pytest.mark.parametrize("case, text, message", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_stored_config_is_refused_before_building(tmp_path, case, text, message):
    path = config_file(tmp_path / f"{case}.safetensors", text)
    with pytest.raises(ValueError, match=message):
        checkpoint.inspect_branch(path)


def test_wrong_tensor_shape_is_named_not_a_torch_size_dump(tiny_branch, tmp_path):
    from safetensors.torch import save_file

    path, branch = tiny_branch
    state = dict(branch.state_dict())
    state["conv_in.weight"] = torch.zeros(32, 9, 1, 1)
    bad = str(tmp_path / "shape.safetensors")
    save_file(state, bad, metadata={"painternet_format": "1", "painternet_config": branch.config.to_json()})
    with pytest.raises(ValueError, match=r"1 tensors whose shape does not match .*conv_in.weight.*\[32, 9, 1, 1\]"):
        load_branch(bad)
    from harness.comfy_helpers import pack_module

    with pytest.raises(ValueError, match=r"shape does not match .*conv_in.weight"):
        pack_module("nodes.branch").load_painternet(bad)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("cross_attention", [True, False], ids=["painternet", "brushnet"])
def test_both_loaders_expect_the_same_tensors(family, cross_attention):
    """The ComfyUI loader checks files against its own meta-device rebuild: it must expect exactly the keys and
    shapes the trainer's diffusers branch writes (SDXL's label embedding included, which ComfyUI's key map lists
    under two names)."""
    from harness.comfy_helpers import pack_module

    unet = TINY_SD15_UNET if family == "sd15" else TINY_SDXL_UNET
    config = PainterNetConfig(family=family, unet=unet, cross_attention=cross_attention,
                              attention_control=cross_attention)
    assert pack_module("nodes.branch").comfy_reference_shapes(config) == checkpoint.reference_shapes(config)


@pytest.mark.parametrize("dtype", ["I8", "BOOL", "F64"])
def test_non_float_weights_are_refused(tiny_branch, tmp_path, dtype):
    from safetensors.torch import save_file

    _, branch = tiny_branch
    state = dict(branch.state_dict())
    state["conv_in.bias"] = state["conv_in.bias"].to({"I8": torch.int8, "BOOL": torch.bool,
                                                      "F64": torch.float64}[dtype])
    bad = str(tmp_path / "dtype.safetensors")
    save_file(state, bad, metadata={"painternet_format": "1", "painternet_config": branch.config.to_json()})
    with pytest.raises(ValueError, match=f"'conv_in.bias' has dtype {dtype}; branch weights are F16, BF16 or F32"):
        load_branch(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused(tiny_branch, tmp_path, value):
    from safetensors.torch import save_file

    _, branch = tiny_branch
    state = dict(branch.state_dict())
    state["layer_control_mid.weight"] = state["layer_control_mid.weight"].clone()
    state["layer_control_mid.weight"][0, 0] = value
    bad = str(tmp_path / "nan.safetensors")
    save_file(state, bad, metadata={"painternet_format": "1", "painternet_config": branch.config.to_json()})
    expected = (f"{quote(bad)}: tensor 'layer_control_mid.weight' contains NaN or infinite values; the file is damaged "
                "(or the training diverged): use another checkpoint")
    with pytest.raises(ValueError, match=r"^" + re.escape(expected) + "$"):
        load_branch(bad)


def test_brushnet_file_without_down_blocks_is_named(tmp_path):
    tensors = {f"brushnet_down_blocks.{i}.weight": tensor("F32", [1]) for i in range(12)}
    path = tmp_path / "brushnet.safetensors"
    write_safetensors(path, tensors)
    with pytest.raises(ValueError, match="has 0 down blocks, expected 4"):
        load_branch(str(path))
    tensors["down_blocks.0.resnets.0.conv1.weight"] = tensor("F32", [4])
    write_safetensors(path, tensors)
    with pytest.raises(ValueError, match="no 4-d down_blocks.0.resnets.0.conv1.weight"):
        load_branch(str(path))


_MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import conftest  # puts the repo and ComfyUI on sys.path, CPU only, like the test process
    from harness.memory import reset_peak, status_bytes
    from painternet_core.checkpoint import load_branch
    from harness.comfy_helpers import pack_module
    loader = pack_module("nodes.branch").load_painternet
    # Warm every import and code path on a small lie first, so the peak below is what the big lie itself costs.
    for path in ({small!r}, {big!r}):
        start = reset_peak()
        errors = []
        for load in (load_branch, loader):
            try:
                load(path)
                errors.append("loaded")
            except ValueError as exc:
                errors.append(str(exc))
        grown = (status_bytes("VmHWM") - start) // 1024
    print(json.dumps({{"grown_kib": grown, "errors": errors}}))
""")


def test_a_1kb_file_whose_config_asks_for_a_huge_branch_costs_no_memory(tmp_path):
    """A file of a few hundred bytes whose config is inside every bound but describes a 37 GB (fp16) branch (4096
    channels everywhere): both loaders compare its header with a meta-device build and refuse it; the process's peak
    RSS does not move by more than a small margin (building it for real would take tens of gigabytes)."""
    huge = dict(SD15_UNET, block_out_channels=[4096] * 4, layers_per_block=2, transformer_layers_per_block=1,
                attention_head_dim=64, cross_attention_dim=8192)
    big = config_file(tmp_path / "big.safetensors", PainterNetConfig(family="sd15", unet=huge).to_json())
    small = config_file(tmp_path / "small.safetensors", PainterNetConfig(family="sd15", unet=TINY_SD15_UNET).to_json())
    assert os.path.getsize(big) < 2048
    script = _MEMORY_PROBE.format(tests=os.path.join(REPO, "tests"), small=small, big=big)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert all("missing keys" in e for e in result["errors"]), result["errors"]
    # Measured on the 2-vCPU AMD EPYC VM: +0.2 MiB (+45 MiB and ~13 s for the largest topology the bounds allow).
    assert result["grown_kib"] < 256 * 1024, f"peak RSS grew {result['grown_kib'] / 1024:.0f} MiB"


# ------------------------------------------------------------------------------ findings 3, 6, 7: shapes

def _stroke(points, width=0.05) -> dict:
    return {"type": "stroke", "width": width, "points": points}


@pytest.mark.parametrize("text, message", [
    ('[{"type": "box", "x": ' + "9" * 400 + ', "y": 0, "w": 1, "h": 1}]', "x must be finite"),
    ('[{"type": "box", "x": ' + "9" * 5000 + ', "y": 0, "w": 1, "h": 1}]', "not usable JSON"),
    ("[" * 100_000 + "]" * 100_000, "not usable JSON"),
    ('{"version": true, "shapes": []}', "shapes version True is not supported"),
    (json.dumps({"version": 1, "shapes": [_stroke([[0.5, 0.5]] * 60_000)] * 2}), "more than 100000 points in all"),
])
def test_bad_shape_documents_are_the_packs_value_error(text, message):
    with pytest.raises(ValueError, match=message):
        shapes.parse_shapes(text)


def test_huge_documents_are_refused_by_size_and_errors_quote_little():
    junk = json.dumps([{"type": "box", "x": "y" * 4_800_000}])
    with pytest.raises(ValueError, match="characters, more than") as refused:
        shapes.parse_shapes(junk)
    assert len(str(refused.value)) < 400
    # Inside the size limit, a junk item is quoted, not echoed.
    junk = json.dumps([{"type": "stroke", "width": 0.1, "points": [["z" * 3_000_000, 0]]}])
    with pytest.raises(ValueError, match="must be a number") as refused:
        shapes.parse_shapes(junk)
    assert len(str(refused.value)) < 2 * QUOTE_LIMIT + 100
    assert len(quote("q" * 10**6)) <= QUOTE_LIMIT + 1


_SHAPES_MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {repo!r})
    from harness.memory import reset_peak, status_bytes
    from painternet_core import shapes
    result = {{}}
    for name in ("largest", "huge"):
        with open({folder!r} + "/" + name + ".json") as fh:
            text = fh.read()
        start = reset_peak()
        try:
            result[name] = float(shapes.render_mask(text, 1024, 1024).mean())
        except ValueError as exc:
            result[name] = str(exc)[:80]
        result[name + "_grown_kib"] = (status_bytes("VmHWM") - start) // 1024
        del text
    print(json.dumps(result))
""")


def test_shape_documents_parse_and_draw_in_bounded_memory(tmp_path):
    """Finding 3: 24 MB of shapes took 1.4 GB RSS to parse. Now the largest accepted document (100 000 points, about
    2 MB) parses and draws at 1024² within a bounded peak, and a 24 MB one is refused by its size before it is
    parsed; measured as a subprocess's peak RSS after the text is in memory."""
    rng = np.random.default_rng(0)
    walk = (np.cumsum(rng.normal(size=(shapes.MAX_TOTAL_POINTS, 2)) * 0.002, axis=0) % 1).round(5).tolist()
    stroke = {"type": "stroke", "width": 0.01, "points": walk}
    (tmp_path / "largest.json").write_text(json.dumps({"version": 1, "shapes": [stroke]}))
    (tmp_path / "huge.json").write_text(json.dumps({"version": 1, "shapes": [stroke] * 12}))
    script = _SHAPES_MEMORY_PROBE.format(repo=REPO, folder=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(result["largest"], float) and result["largest"] > 0, result
    assert "characters, more than" in result["huge"], result
    # Measured on the 2-vCPU AMD EPYC VM: +37 MiB for the largest document, +0 MiB for the refused 24 MB one.
    assert result["largest_grown_kib"] < 192 * 1024, result
    assert result["huge_grown_kib"] < 16 * 1024, result


def test_drawing_work_over_the_budget_is_refused_and_under_it_is_bounded():
    # 20 strokes x 5000 points zig-zagging across a 2048x2048 image with a wide brush: the stall, scaled
    # to the point limit. Refused by counting, before anything is drawn.
    zigzag = [[0.0 if i % 2 else 1.0, (i % 97) / 97] for i in range(5000)]
    doc = shapes.parse_shapes(json.dumps([_stroke(zigzag, 0.3)] * 20))
    assert shapes.raster_work(doc, 2048, 2048) > shapes.raster_budget(2048, 2048)
    with pytest.raises(ValueError, match="units of drawing work .* more than the"):
        shapes.rasterize(doc, 2048, 2048)
    # A long hand-drawn scribble with the editor's widest brush is far under the budget.
    rng = np.random.default_rng(0)
    walk = (np.cumsum(rng.normal(size=(3000, 2)) * 0.003, axis=0) % 1).tolist()
    hand = shapes.parse_shapes(json.dumps([_stroke(walk, 0.3)]))
    assert shapes.raster_work(hand, 2048, 2048) < shapes.raster_budget(2048, 2048) / 4


def test_chunked_drawing_is_pixel_identical_and_polls_interrupt(monkeypatch):
    rng = np.random.default_rng(1)
    doc = [shapes.Stroke(tuple(map(tuple, rng.random((400, 2)) * 1.2 - 0.1)), w) for w in (0.004, 0.05, 0.2)]
    doc.append(shapes.Stroke(((0.5, 0.5), (0.5, 0.5), (0.5, 0.5)), 0.1))
    doc.append(shapes.Box(0.1, 0.1, 0.3, 0.2))
    whole = shapes.rasterize(doc, 96, 128)
    calls = []
    monkeypatch.setattr(shapes, "RASTER_CHUNK_WORK", 40)
    chunked = shapes.rasterize(doc, 96, 128, check_interrupt=lambda: calls.append(1))
    np.testing.assert_array_equal(chunked, whole)
    assert len(calls) > 100

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        shapes.rasterize(doc, 96, 128, check_interrupt=stop)


# ------------------------------------------------------------------------- findings 4, 8, 9: node limits

@pytest.fixture(scope="module")
def node_classes():
    from harness.comfy_helpers import load_pack

    return load_pack()


@pytest.mark.parametrize("node, kwargs, message", [
    ("PainterNetMaskGenerator", {"strokes_max": 10**6}, r"strokes_max=1000000 is outside \[0, 64\]"),
    ("PainterNetMaskGenerator", {"strokes_max": 10**9}, r"strokes_max=1000000000 is outside"),
    ("PainterNetMaskGenerator", {"dilation_scale": float("nan")}, r"dilation_scale=nan must be a finite number"),
    ("PainterNetMaskGenerator", {"segments_min": 0}, r"segments_min=0 is outside \[1, 64\]"),
    ("PainterNetMaskGenerator", {"width_max": 2.5}, r"width_max=2.5 is outside"),
    ("PainterNetMaskGenerator", {"seed": -1}, r"seed=-1 is outside"),
    ("PainterNetMaskGenerator", {"strokes_min": 1.5}, r"strokes_min=1.5 must be an integer"),
])
def test_mask_generator_refuses_linked_values_outside_its_ranges(node_classes, node, kwargs, message):
    args = {"mask": torch.ones(1, 8, 8), "mode": "irregular", "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        node_classes[node].execute(**args)


@pytest.mark.parametrize("scale, message", [(float("nan"), "scale=nan must be a finite number"),
                                            (float("inf"), "scale=inf must be a finite number"),
                                            (-5.0, r"scale=-5.0 is outside \[0.0, 10.0\]"),
                                            (11.0, r"scale=11.0 is outside")])
def test_apply_refuses_nan_and_out_of_range_scale(node_classes, scale, message):
    with pytest.raises(ValueError, match=message):
        node_classes["PainterNetApply"].execute(None, None, None, None, None, None, None, scale, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"end_percent=nan"):
        node_classes["PainterNetApply"].execute(None, None, None, None, None, None, None, 1.0, 0.0, float("nan"))


def test_loader_and_box_mask_refuse_values_of_the_wrong_kind(node_classes):
    # ComfyUI 0.3.75 does not check a V3 combo's value against its options at all: the node does.
    with pytest.raises(ValueError, match=r"^PainterNetLoader: input painternet_name='x.safetensors' is not one of"):
        node_classes["PainterNetLoader"].execute("x.safetensors", "fp16")
    with pytest.raises(ValueError, match=r"invert='yes' must be true or false"):
        node_classes["PainterNetBoxMask"].execute(torch.zeros(1, 4, 4, 3), "", "yes")
    with pytest.raises(ValueError, match=r"shapes=5 must be a string"):
        node_classes["PainterNetBoxMask"].execute(torch.zeros(1, 4, 4, 3), 5, False)


HUGE_LINKED = [
    ("PainterNetApply", {"scale": 10**400}, "scale"),
    ("PainterNetMaskGenerator", {"seed": 10**400}, "seed"),
    ("PainterNetMaskGenerator", {"box_expand_max": 10**400}, "box_expand_max"),
    ("PainterNetMaskGenerator", {"strokes_max": 10**400}, "strokes_max"),
    ("PainterNetCrop", {"context": 10**400}, "context"),
    ("PainterNetCrop", {"grow": -10**5000}, "grow"),  # past Python's 4300-digit str() limit: never printed whole
]


@pytest.mark.parametrize("node, kwargs, field", HUGE_LINKED, ids=[f"{n}-{f}" for n, _, f in HUGE_LINKED])
def test_huge_linked_ints_are_refused_naming_node_and_field(node_classes, node, kwargs, field):
    """Issue 21 item 5: a linked 10**400 raised a raw OverflowError (math.isfinite on an int) naming nothing."""
    base = {
        "PainterNetApply": dict(model=None, vae=None, image=None, mask=None, painternet=None, positive=None,
                                negative=None, scale=1.0, start_percent=0.0, end_percent=1.0),
        "PainterNetMaskGenerator": dict(mask=torch.ones(1, 8, 8), mode="irregular", seed=0),
        "PainterNetCrop": dict(image=torch.rand(1, 32, 32, 3), mask=torch.ones(1, 32, 32), resolution=64,
                               context=0.5, grow=4, feather=4),
    }[node]
    with pytest.raises(ValueError) as err:
        node_classes[node].execute(**(base | kwargs))
    message = str(err.value)
    assert message.startswith(f"{node}: input {field}=") and "is outside [" in message, message
    assert len(message) < 500


@pytest.fixture
def interrupt():
    """Press ComfyUI's interrupt (what `POST /interrupt` does); the flag clears when a poll raises."""
    import comfy.model_management as mm

    yield lambda: mm.interrupt_current_processing(True)
    mm.interrupt_current_processing(False)


def test_mask_nodes_honour_interrupt_while_working(node_classes, interrupt, tmp_path):
    import folder_paths
    from comfy.model_management import InterruptProcessingException

    previous = folder_paths.get_temp_directory()
    folder_paths.set_temp_directory(str(tmp_path))  # the box-mask node saves its preview there

    interrupt()
    with pytest.raises(InterruptProcessingException):
        node_classes["PainterNetMaskGenerator"].execute(torch.ones(3, 16, 16), "irregular", 0)
    interrupt()
    text = json.dumps([_stroke([[0.1, 0.1], [0.9, 0.9]])])
    with pytest.raises(InterruptProcessingException):
        node_classes["PainterNetBoxMask"].execute(torch.zeros(1, 16, 16, 3), text, False)
    # Once the interrupt is consumed, the same calls work.
    try:
        assert node_classes["PainterNetBoxMask"].execute(torch.zeros(1, 16, 16, 3), text, False).result[0].any()
    finally:
        folder_paths.set_temp_directory(previous)


def test_running_sum_rect_dilation_equals_cv2_dilate():
    """Finding 9: dilation_scale at its maximum paid cv2.dilate's area x kernel cost (52 s per 8192² item); the rect
    dilation is now two running-sum passes, whose cost does not depend on the kernel. Same pixels as before."""
    import cv2

    from painternet_core.masks import dilate_rect

    seg = np.zeros((300, 200), np.uint8)
    seg[140:150, 90:100] = 1
    for k, it in ((1, 1), (2, 3), (7, 2), (150, 3), (299, 1)):
        np.testing.assert_array_equal(dilate_rect(seg, k, it), cv2.dilate(seg, np.ones((k, k), np.uint8),
                                                                          iterations=it))
