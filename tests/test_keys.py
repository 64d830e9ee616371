"""Datastore keys: made, sealed by a passphrase, shown on paper (a QR code read back by zbar),
typed back in, and derived in a shell with openssl alone."""
from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest
from engine import imaging, last_line, one_error_line

from imaging.datastore import keys

PASSPHRASE = "correct horse battery staple"
# Half-block characters segno's compact terminal output draws two rows of modules with.
HALF_BLOCKS = {" ": (0, 0), "▀": (1, 0), "▄": (0, 1), "█": (1, 1)}


def run_key(*args, passphrase=None, new_passphrase=None, key_text=None, check=True):
    env = {key: value for key, value in os.environ.items()
           if key not in ("IMAGING_PASSPHRASE", "IMAGING_NEW_PASSPHRASE", "IMAGING_KEY")}
    for name, value in (("IMAGING_PASSPHRASE", passphrase),
                        ("IMAGING_NEW_PASSPHRASE", new_passphrase), ("IMAGING_KEY", key_text)):
        if value is not None:
            env[name] = value
    return imaging("key", *args, check=check, env=env, stdin=subprocess.DEVNULL)


def test_a_new_key_file_is_private_and_its_line_gives_back_the_same_key(tmp_path):
    path = tmp_path / "store.key"
    made = run_key("create", path)
    record = json.loads(path.read_text())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(record) == {"imaging_key", "fingerprint", "created", "key"}
    assert f"created key {record['fingerprint']} in {path}, not protected" in made.stdout
    shown = run_key("show", path)
    line = last_line(shown.stdout)
    assert line.startswith("imaging-key-1-") and len(line.split("-")) == 12
    key = keys.from_text(line)
    assert key.master.hex() == record["key"] and key.fingerprint == record["fingerprint"]
    assert shown.stdout.splitlines()[0] == f"fingerprint {record['fingerprint']}"


def test_create_never_replaces_a_key(tmp_path):
    path = tmp_path / "store.key"
    run_key("create", path)
    before = path.read_bytes()
    error = one_error_line(run_key("create", path, check=False))
    assert error == f"imaging: error: key file {path} exists: a new key never replaces one"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.key"]


def test_a_passphrase_seals_the_key_and_a_wrong_one_is_one_line(tmp_path):
    path = tmp_path / "store.key"
    run_key("create", path, passphrase=PASSPHRASE)
    record = json.loads(path.read_text())
    assert "key" not in record and set(record["scrypt"]) == {"n", "r", "p", "salt"}
    assert record["fingerprint"] not in record["sealed"]
    assert one_error_line(run_key("show", path, check=False)) == (
        f"imaging: error: key file {path} is protected by a passphrase: set IMAGING_PASSPHRASE")
    assert one_error_line(run_key("show", path, passphrase="wrong", check=False)) == (
        f"imaging: error: wrong passphrase for key file {path}")
    key = keys.from_text(last_line(run_key("show", path, passphrase=PASSPHRASE).stdout))
    assert key.fingerprint == record["fingerprint"]


def test_a_sealed_key_whose_fingerprint_was_edited_does_not_open(tmp_path):
    path = tmp_path / "store.key"
    keys.create(path, PASSPHRASE)
    record = json.loads(path.read_text())
    record["fingerprint"] = "0000-0000-0000-0000"
    path.write_text(json.dumps(record))
    with pytest.raises(keys.BadKey, match="^wrong passphrase for key file"):
        keys.load(path, PASSPHRASE)


def test_changing_the_passphrase_keeps_the_key(tmp_path):
    path = tmp_path / "store.key"
    run_key("create", path, passphrase=PASSPHRASE)
    line = last_line(run_key("show", path, passphrase=PASSPHRASE).stdout)
    changed = run_key("change-passphrase", path, passphrase=PASSPHRASE, new_passphrase="other")
    assert "now protected by the new passphrase" in changed.stdout
    assert one_error_line(run_key("show", path, passphrase=PASSPHRASE, check=False)).endswith(
        f"wrong passphrase for key file {path}")
    assert last_line(run_key("show", path, passphrase="other").stdout) == line
    unchanged = path.read_bytes()
    refused = run_key("change-passphrase", path, passphrase="other", new_passphrase="",
                      check=False)
    assert one_error_line(refused) == (
        "imaging: error: no new passphrase (IMAGING_NEW_PASSPHRASE, or typed): nothing changed; "
        "--no-passphrase removes the protection")
    assert path.read_bytes() == unchanged
    run_key("change-passphrase", path, "--no-passphrase", passphrase="other")
    assert "key" in json.loads(path.read_text())
    assert last_line(run_key("show", path).stdout) == line
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_key_typed_back_from_paper_makes_the_same_key_file(tmp_path):
    original = keys.create(tmp_path / "lost.key")
    typed = original.text().upper().replace("-", "- ", 3)  # spaces and capitals, as typed
    run_key("import", tmp_path / "again.key", key_text=typed)
    assert keys.load(tmp_path / "again.key") == original


@pytest.mark.parametrize("change, error", [
    (lambda line: line[:-1] + ("0" if line[-1] != "0" else "1"),
     "the key's check group does not match: a digit is mistyped"),
    (lambda line: line.replace("imaging-key-1-", "imaging-key-2-"),
     "not an imaging key: it starts with 'imaging-key-1-'"),
    (lambda line: line[:-9], "not an imaging key: it holds nine groups of eight hex digits"),
    (lambda line: line[:20] + "g" + line[21:], "not an imaging key: only 0-9 and a-f may follow "
                                               "its prefix"),
])
def test_a_mistyped_key_line_is_refused_with_what_is_wrong(tmp_path, change, error):
    line = keys.generate().text()
    result = run_key("import", tmp_path / "typed.key", key_text=change(line), check=False)
    assert one_error_line(result) == f"imaging: error: {error}"
    assert not (tmp_path / "typed.key").exists()


@pytest.mark.parametrize("content, error", [
    (None, "key file {path}: no such file"),
    ("not json", "{path} is not an imaging key file (not JSON)"),
    ('{"imaging_key": 9, "fingerprint": "x"}', "{path} is not an imaging key file of format 1"),
    ('{"imaging_key": 1, "fingerprint": "x", "key": "zz"}',
     "key file {path} is damaged: it holds no key"),
    ('{"imaging_key": 1, "fingerprint": "0000-0000-0000-0000", "key": "' + "ab" * 32 + '"}',
     "key file {path} is damaged: its key does not match its fingerprint"),
])
def test_a_missing_or_damaged_key_file_is_one_line(tmp_path, content, error):
    path = tmp_path / "store.key"
    if content is not None:
        path.write_text(content)
    assert one_error_line(run_key("show", path, check=False)) == (
        "imaging: error: " + error.format(path=path))


def test_the_subkeys_are_what_openssl_derives_in_a_shell():
    key = keys.generate()
    for purpose in ("encryption", "gmac", "chunk-id", "fingerprint"):
        shell = subprocess.run(
            ["sh", "-c", f"printf 'imaging {purpose} v1\\001' | openssl dgst -sha256 -mac HMAC "
                         f"-macopt hexkey:{key.master.hex()} | sed 's/.*= //'"],
            capture_output=True, text=True, check=True)
        assert shell.stdout.strip() == key.derived(purpose).hex()


def test_the_paper_key_holds_a_qr_code_that_reads_back_as_the_line(tmp_path):
    path = tmp_path / "store.key"
    keys.create(path)
    paper = run_key("show", path, "--paper").stdout
    line = last_line(paper)
    assert keys.from_text(line) == keys.load(path)
    assert "IMAGING_KEY='<the line below>' sh IMAGE/RESTORE.txt /dev/sdX" in paper
    code = [row for row in paper.splitlines() if row and set(row) <= set(HALF_BLOCKS)]
    assert len(code) > 10
    picture = tmp_path / "qr.pbm"
    picture.write_text(_pbm(code))
    read = subprocess.run(["zbarimg", "--quiet", "--raw", str(picture)],
                          capture_output=True, text=True, timeout=60)
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == line


def _pbm(rows: list[str], scale: int = 6) -> str:
    """The terminal's QR code as a plain PBM picture (1 = dark), each module `scale` pixels.

    segno draws dark modules as the terminal's background (light text on dark), so the
    characters' lit halves are the light modules."""
    width = max(len(row) for row in rows)
    modules = []
    for row in rows:
        top, bottom = [], []
        for char in row.ljust(width):
            lit_top, lit_bottom = HALF_BLOCKS[char]
            top.append(1 - lit_top)
            bottom.append(1 - lit_bottom)
        modules += [top, bottom]
    pad = 4
    modules = [[0] * (width + 2 * pad)] * pad + [[0] * pad + m + [0] * pad for m in modules] \
        + [[0] * (width + 2 * pad)] * pad
    lines = [f"P1\n{len(modules[0]) * scale} {len(modules) * scale}"]
    for module_row in modules:
        pixels = " ".join(str(m) for m in module_row for _ in range(scale))
        lines += [pixels] * scale
    return "\n".join(lines) + "\n"
