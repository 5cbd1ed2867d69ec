"""What a weight file is, from its first bytes — without importing torch.

Used by the downloader (a Drive quota page arrives with status 200 and must not be saved as
weights) and by the reader's checks (:func:`clipinvert.weights.safety.check_file`).
"""

from __future__ import annotations

from pathlib import Path

ZIP_MAGIC = b"PK"  # torch.save (since 1.6) and torch.jit.save write zip archives
PICKLE_MAGIC = b"\x80"  # torch.save's legacy format starts with a pickle's PROTO opcode


def looks_like_html(head: bytes) -> bool:
    """True for the first bytes of an HTML page (Drive/quota/login pages saved as weights).

    No checkpoint format we read starts with ``<``: zip archives start with ``PK``, legacy
    pickles with ``\\x80``, safetensors with a little-endian length, dlib ``.dat`` with digits.
    """
    head = head.lstrip()
    return head[:1] == b"<" or head[:9].lower() == b"<!doctype"


def file_looks_like_html(path: Path) -> bool:
    with Path(path).open("rb") as fh:
        return looks_like_html(fh.read(512))
