"""CSV exports a chunk at a time: the chunks join to exactly what one csv.writer writes, however they are cut."""

from __future__ import annotations

import csv
import io

import pytest

from metering.billing.export import csv_chunks

HEADER = ("a", "b")


def whole(rows: list[tuple[object, ...]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(HEADER)
    writer.writerows(rows)
    return buffer.getvalue()


@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 7])
def test_chunks_join_to_the_whole_text_and_hold_at_most_chunk_rows_rows(count: int) -> None:
    rows = [(i, f'x,"{i}"\nnext') for i in range(count)]
    chunks = list(csv_chunks(HEADER, iter(rows), chunk_rows=3))
    assert "".join(chunks) == whole(rows)
    assert len(chunks) == max(1, -(-count // 3))  # the header comes with the first rows; alone when none
    assert chunks[0].startswith("a,b\r\n")
