"""Sizes as people write them, read alike by the CLI, the dashboard's forms and the benchmark:
coreutils' `split -b` rules (K, M, G = powers of 1024; KB, MB, GB = powers of 1000)."""
from __future__ import annotations

import argparse
import random

import pytest
from engine import MiB, imaging, last_line, one_error_line

from bench.system import size_argument
from imaging.base.errors import ImagingError
from imaging.base.tools import parse_size
from webui.forms import ExportForm

KiB, GiB, TiB = 1024, 1024 ** 3, 1024 ** 4

READ = [
    ("4096", 4096), ("1", 1), ("  2G  ", 2 * GiB), ("007", 7),
    ("1K", KiB), ("1k", KiB), ("1KiB", KiB), ("1kib", KiB), ("1KB", 1000), ("1kB", 1000),
    ("3m", 3 * MiB), ("700MiB", 700 * MiB), ("700 MiB", 700 * MiB), ("2MB", 2_000_000),
    ("2G", 2 * GiB), ("2GiB", 2 * GiB), ("2GB", 2_000_000_000), ("2gb", 2_000_000_000),
    ("1T", TiB), ("1TB", 10 ** 12), ("1P", 1024 ** 5), ("1PB", 10 ** 15),
]
REFUSED = ["", "   ", "0", "0K", "000", "-1", "-2G", "+2G", "2X", "G", "GB", "1.5G", "2,5M",
           "2B", "2iB", "2 G B", "2GiBB", "0x10", "1e6", "１２M", "2\u212a", "2G\n3"]


@pytest.mark.parametrize("text, expected", READ)
def test_a_size_is_read_as_split_reads_it(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", REFUSED)
def test_junk_zero_and_negatives_are_refused_in_one_line(text):
    with pytest.raises(ImagingError) as refused:
        parse_size(text)
    message = str(refused.value)
    assert message.startswith(f"invalid size {text!r}: ") and "\n" not in message
    assert "powers of 1024" in message and "powers of 1000" in message


def test_the_benchmark_takes_the_same_sizes():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=size_argument)
    assert parser.parse_args(["--size", "2GB"]).size == 2_000_000_000
    assert parser.parse_args(["--size", "256M"]).size == 256 * MiB
    with pytest.raises(argparse.ArgumentTypeError, match="invalid size '1.5G'"):
        size_argument("1.5G")


# -- the CLI and the dashboard's export form agree -----------------------------------

@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """An image of 3 MiB of noise, which compresses to more than 3 MiB: every part but
    the last of its export is as long as the part size asked for."""
    folder = tmp_path_factory.mktemp("sizes")
    disk = folder / "disk.img"
    disk.write_bytes(random.Random(19).randbytes(3 * MiB))
    return last_line(imaging("backup", disk, "--store", folder / "store", "--disk", "d").stdout)


@pytest.mark.parametrize("text, expected", [
    ("1MB", 1_000_000), ("1000KB", 1_000_000), ("1M", MiB), ("1MiB", MiB), ("1000000", 1_000_000),
])
def test_the_cli_and_the_export_form_cut_parts_alike(image, text, expected, tmp_path):
    out = tmp_path / "d.zst"
    imaging("export", image, out, "--level", "1", "--split", text)
    assert (tmp_path / "d.zst.aa").stat().st_size == expected
    form = ExportForm({"name": "d.zst", "level": "1", "split_size": text})
    assert form.is_valid(), form.errors
    assert form.cleaned_data["split_size"] == expected


@pytest.mark.parametrize("text", ["0", "-2G", "2X", "1.5G"])
def test_the_cli_and_the_export_form_refuse_the_same_sizes_with_the_same_line(image, text,
                                                                           tmp_path):
    line = one_error_line(imaging("export", image, tmp_path / "d.zst", f"--split={text}",
                                  check=False))
    form = ExportForm({"name": "d.zst", "level": "1", "split_size": text})
    assert not form.is_valid()
    assert form.errors["split_size"] == [line.removeprefix("imaging: error: ")]
    assert list(tmp_path.iterdir()) == []
