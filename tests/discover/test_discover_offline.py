"""Offline discovery refuses unreadable or non-capture files with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from depdrill.discover.run import DiscoverOptions, run
from depdrill.errors import InputError


def test_a_missing_pcap_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        run(DiscoverOptions(pcap=tmp_path / "absent.pcap"))


def test_a_directory_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        run(DiscoverOptions(pcap=tmp_path))


def test_a_file_that_is_not_a_capture_is_an_input_error(tmp_path: Path) -> None:
    # Given a text file and an empty file named like captures
    text, empty = tmp_path / "notes.pcap", tmp_path / "empty.pcapng"
    text.write_text("not a capture at all\n")
    empty.write_bytes(b"")
    # Then each is refused with a message naming it
    for path in (text, empty):
        with pytest.raises(InputError, match=path.name):
            run(DiscoverOptions(pcap=path))


def test_options_need_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        DiscoverOptions()
