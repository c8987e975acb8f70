"""Output decoding: any bytes, in any chunks, come out as UTF-8 text with U+FFFD, line by line.

The reference is ``bytes.decode("utf-8", "replace")`` of the whole output, split on ``\\n`` (one
trailing ``\\r`` dropped from each finished line), each line cut into pieces of at most
``MAX_LINE`` characters. ``plugins.command.PipeReader`` must produce exactly that whatever the
chunking, from a real pipe watched by the event loop; a few cases also go through a real
subprocess.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque

import pytest
import shipyard._secrets as secrets_module
from hypothesis import HealthCheck
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from shipyard import _output as output
from shipyard.plugins import command


def reference(data: bytes, max_line: int) -> list[str]:
    text = data.decode("utf-8", "replace")
    *finished, last = text.split("\n")
    lines = [line[:-1] if line.endswith("\r") else line for line in finished]
    if last:
        lines.append(last)
    pieces = []
    for line in lines:
        pieces += [line[i : i + max_line] for i in range(0, len(line), max_line)] or [""]
    return pieces


class Collector:
    """The part of a StepContext that ``PipeReader`` uses."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.batches = 0

    def log_lines(self, lines, stream="stdout"):
        assert stream == "out"
        self.lines += lines
        self.batches += 1


async def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to the non-blocking pipe ``fd``, letting the loop run while it is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await asyncio.sleep(0.001)


async def settle() -> None:
    for _ in range(3):  # let the reader take what was written before more arrives
        await asyncio.sleep(0)


async def read_chunks(chunks: list[bytes]) -> Collector:
    """Feed ``chunks`` through a real pipe to the command step's reader; what it logged."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    collector = Collector()
    try:
        reader = command.PipeReader(read_fd, "out", collector, deque(maxlen=20))
        for chunk in chunks:
            await write_all(write_fd, chunk)
            await settle()
        os.close(write_fd)
        write_fd = -1
        await asyncio.wait_for(reader.eof, 10)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    return collector


@pytest.fixture(autouse=True)
def no_secrets(monkeypatch):
    # Lines are cut at MAX_LINE exactly unless a registered secret spans the cut: test without.
    for attr, empty in (("_state", None), ("_pattern", None), ("_values", set())):
        if hasattr(secrets_module, attr):
            monkeypatch.setattr(secrets_module, attr, empty)


# Bytes rich in what matters: newlines, CR, multi-byte UTF-8 and its fragments, invalid bytes.
interesting = st.lists(
    st.sampled_from(
        [b"\n", b"\r", b"\r\n", b"a", b"xyz", "é".encode(), "€".encode(), "𝄞".encode(),
         "€".encode()[:2], "𝄞".encode()[1:], b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80",
         b"\xf0\x9f", b"\x00", b" "]
    ),
    max_size=40,
).map(b"".join)  # fmt: skip
any_bytes = st.one_of(interesting, st.binary(max_size=200))


@st.composite
def chunked(draw, data_strategy=any_bytes):
    data = draw(data_strategy)
    cuts = sorted(draw(st.sets(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return data, [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked(), st.integers(1, 12), st.integers(1, 16))
@example((b"0123456789\n", [b"0123456789\n"]), 4, 64)  # a whole long line in one chunk
@example((b"abcd\r\n", [b"abcd\r", b"\n"]), 4, 64)  # the CR of a line exactly MAX_LINE long
@example((b"ab\xe2\x82\xacd\n", [b"ab\xe2", b"\x82\xacd\n"]), 64, 64)  # split inside a character
def test_reader_decodes_like_bytes_decode_in_any_chunking(case, max_line, chunk):
    data, chunks = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(output, "MAX_LINE", max_line)
        mp.setattr(command, "_CHUNK", chunk)
        collector = asyncio.run(read_chunks(chunks))
    assert collector.lines == reference(data, max_line)


def test_reader_logs_lines_as_they_arrive():
    async def scenario():
        read_fd, write_fd = os.pipe()
        collector = Collector()
        reader = command.PipeReader(read_fd, "out", collector, deque())
        os.write(write_fd, b"first\nsec")
        await settle()
        seen_early = list(collector.lines)  # before the pipe was closed
        os.write(write_fd, b"ond\n")
        os.close(write_fd)
        await asyncio.wait_for(reader.eof, 10)
        os.close(read_fd)
        return seen_early, collector.lines


def test_a_long_line_is_split_at_64_kib():
    line = "x" * (3 * command.MAX_LINE + 5)
    collector = asyncio.run(read_chunks([line.encode() + b"\n"]))
    assert [len(piece) for piece in collector.lines] == [command.MAX_LINE] * 3 + [5]
    assert "".join(collector.lines) == line


CASES = [
    pytest.param(b"caf\xe9\n\xff\xfe\nok\n", id="latin-1"),
    pytest.param(b"\xe2\x82\xac euro\r\nsplit \xf0\x9f\x98", id="crlf-and-truncated-emoji"),
    pytest.param(b"\x00nul\x00\n\n\nend", id="nul-and-empty-lines"),
    pytest.param(bytes(range(256)) * 4, id="every-byte"),
]


@pytest.mark.parametrize("data", CASES)
def test_end_to_end_through_a_real_process(shipyarder, data):
    # The child writes the bytes in several writes with pauses, so the pipe delivers them in
    # pieces that cut through lines and characters.
    shipyarder.makefile("payload.bin", data)
    shipyarder.makefile(
        "writer.py",
        """
        import os
        import time

        data = open("payload.bin", "rb").read()
        for i in range(0, len(data), 7):
            os.write(1, data[i : i + 7])
            time.sleep(0.001)
        """,
    )
    shipyarder.makepipelines(
        """
        import sys
        import shipyard as sy

        @sy.pipeline
        def web(d):
            return [sy.stage("s", sy.command(sys.executable, "writer.py", name="bytes"))]
        """
    )
    deployed = shipyarder.deploy("web", "1", "x")
    assert deployed.status == "succeeded", deployed.document
    import sqlite3

    conn = sqlite3.connect(shipyarder.history_path)
    try:
        rows = conn.execute(
            "SELECT line FROM logs WHERE deployment_id=? AND stream='stdout' ORDER BY id",
            (deployed.id,),
        ).fetchall()
    finally:
        conn.close()
    assert [r[0] for r in rows] == reference(data, command.MAX_LINE)
