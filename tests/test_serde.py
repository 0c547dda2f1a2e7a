"""State dict <-> chunks, both paths; the committed gRPC stubs match the .proto."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flmem import serde
from flmem.codec import ModelCodec
from tests.conftest import REPO

PATHS = [(False, False), (False, True), (True, False), (True, True)]


def sample_state():
    gen = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(3000, generator=gen),                      # 12,000 bytes: larger than a chunk
        "conv.weight": torch.randn(4, 3, 3, 3, generator=gen),
        "odd": torch.randn(7, generator=gen).to(torch.float16),       # 14 bytes: padding needed
        "bf": torch.randn(5, generator=gen).to(torch.bfloat16),
        "num_batches_tracked": torch.tensor(17, dtype=torch.int64),   # 0-d integer buffer
        "empty": torch.zeros(0),
        "transposed": torch.randn(6, 4, generator=gen).t(),           # not contiguous
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("serde_opt, transport_opt", PATHS)
def test_round_trip_with_tensors_larger_than_a_chunk(serde_opt, transport_opt):
    state = sample_state()
    codec = ModelCodec(serde_opt, transport_opt, chunk_size=1024)
    header, chunks = codec.encode(state)
    chunks = list(chunks)
    assert len(chunks) > 1 and all(len(d) <= 1024 for _, d in chunks)
    assert [off for off, _ in chunks] == [i * 1024 for i in range(len(chunks))]
    assert_same(codec.receive(header, iter(chunks)), state)


@pytest.mark.parametrize("serde_opt, transport_opt", PATHS)
def test_receive_into_overwrites_the_targets_storage(serde_opt, transport_opt):
    state = sample_state()
    target = {k: torch.zeros_like(v).contiguous() for k, v in state.items()}
    pointers = {k: v.data_ptr() for k, v in target.items()}
    codec = ModelCodec(serde_opt, transport_opt, chunk_size=1000)
    header, chunks = codec.encode(state)
    codec.receive_into(header, chunks, target)
    assert_same(target, {k: v.contiguous() for k, v in state.items()})
    assert pointers == {k: v.data_ptr() for k, v in target.items()}


def test_raw_chunks_never_split_an_element():
    state = sample_state()
    layout = serde.Layout.of(state)
    assert all(e.offset % serde.ALIGN == 0 for e in layout.entries)
    for offset, data in serde.iter_raw_chunks(state, layout, 1003):  # rounded down to 1000
        assert offset % 8 == 0 and len(data) <= 1000


def test_layout_mismatch_names_the_tensor():
    codec = ModelCodec(True, True, 4096)
    header, chunks = codec.encode({"w": torch.zeros(3)})
    with pytest.raises(serde.LayoutMismatchError, match="tensor 'w'"):
        codec.receive_into(header, chunks, {"w": torch.zeros(4)})


def test_original_path_names_the_2gib_protobuf_limit(monkeypatch):
    monkeypatch.setattr(serde, "PROTOBUF_LIMIT", 100)  # a 2 GiB tensor does not fit this test machine's budget
    with pytest.raises(serde.PayloadTooLargeError, match="limited to 2 GiB.*optimization.serde=true"):
        ModelCodec(False, True, 4096).encode({"w": torch.zeros(1000)})


@pytest.mark.parametrize("serde_opt, transport_opt", PATHS)
def test_truncated_stream_is_an_error_on_every_path(serde_opt, transport_opt):
    from flmem.strategies import RunningSum

    state = sample_state()
    codec = ModelCodec(serde_opt, transport_opt, 1024)
    header, chunks = codec.encode(state)
    short = list(chunks)[:-1]
    with pytest.raises(ValueError, match="stream ended after"):
        codec.receive(header, short)
    with pytest.raises(ValueError, match="stream ended after"):
        codec.receive_into(header, short, {k: torch.zeros_like(v).contiguous() for k, v in state.items()})
    agg = RunningSum(state)
    with pytest.raises(ValueError, match="stream ended after"):
        codec.fold(header, short, agg, 1.0)
    assert agg.num_updates == 0  # a partial update is not counted as one


def test_committed_grpc_stubs_match_the_proto(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO}", f"--python_out={tmp_path}",
                           f"--grpc_python_out={tmp_path}", str(REPO / "flmem/proto/flmem.proto")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("flmem_pb2.py", "flmem_pb2_grpc.py"):
        fresh = (tmp_path / "flmem/proto" / name).read_text()
        assert fresh == (REPO / "flmem/proto" / name).read_text(), \
            f"{name} is stale: regenerate with python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. " \
            "flmem/proto/flmem.proto"


def test_a_tensor_table_must_follow_from_its_dtypes_and_shapes():
    from flmem.codec import check_claimed_size

    state = sample_state()
    layout = serde.Layout.of(state)
    good = serde.make_header("raw", layout.total_bytes, layout)
    assert serde.header_layout(good) == layout
    wrong_dtype = [[n, "float64" if i == 0 else d, s, o, b] for i, (n, d, s, o, b) in enumerate(layout.to_json())]
    with pytest.raises(serde.LayoutMismatchError, match="the table puts .* make .* bytes"):
        serde.header_layout({**good, "tensors": wrong_dtype})
    with pytest.raises(serde.LayoutMismatchError, match="claims 1099511627776 payload bytes"):
        serde.header_layout({**good, "total_bytes": 2**40})
    with pytest.raises(serde.LayoutMismatchError, match="malformed tensor table"):
        serde.header_layout({**good, "tensors": [["w", "nosuchdtype", [2], 0, 8]]})
    with pytest.raises(ValueError, match="claims 1099511627776 payload bytes"):  # refused before any buffer exists
        check_claimed_size({"format": "torch", "total_bytes": 2**40}, layout.total_bytes)
    check_claimed_size({"format": "torch", "total_bytes": layout.total_bytes + 4096}, layout.total_bytes)
