"""`mt-shard pack SRC s3://bucket/prefix`: pack into a local staging folder, then push it, manifest last.

The staging folder is the same for the same URL (or the folder given with --staging), so a killed
or failed run resumes where it stopped: pack keeps its finished shards, push skips what is already
uploaded. The default staging folder is removed once the push is done; one given with --staging is
kept (it is then a local copy of the set).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from shard_tools import s3
from shard_tools.format import MANIFEST_NAME, ShardFormatError
from shard_tools.pack import PackSummary, pack
from shard_tools.push import DEFAULT_WORKERS, PushSummary, push
from shard_tools.s3_claim import claim_prefix


def staging_folder(url: str) -> Path:
    """The default staging folder of a pack to `url`: private to this user, the same on every run."""
    root = Path(tempfile.gettempdir()) / f"mt-shard-{os.getuid()}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(root)
    except OSError as exc:
        raise ShardFormatError(f"{root}: cannot make the staging folder ({exc.strerror}); give --staging DIR") from None
    # a shared temp folder: refuse one another user made, or a link, rather than write the set into it
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ShardFormatError(f"{root}: not a private folder of this user; remove it, or give --staging DIR")
    return root / f"pack-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def pack_to_s3(source: str | Path, url: str, *, staging: str | Path | None = None,
               push_workers: int = DEFAULT_WORKERS, progress: bool = True,
               **pack_options: Any) -> tuple[PackSummary, PushSummary, Path | None]:
    """Pack `source` into a staging folder, then push it to the s3:// prefix `url`.

    Returns the two summaries and the staging folder when it is kept (None when it was removed).
    `pack_options` are pack()'s keyword arguments.
    """
    s3.parse_url(url)
    # Before the long pack: the store answers (endpoint, credentials, bucket) and the prefix is free.
    if s3.object_info(s3.join(url, MANIFEST_NAME)) is not None:
        raise ShardFormatError(
            f"{s3.join(url, MANIFEST_NAME)}: the prefix already holds a complete shard set; pack to a new prefix, "
            "or delete that set first"
        )
    folder = Path(staging) if staging is not None else staging_folder(url)
    with claim_prefix(url, "mt-shard pack"):  # one writer per prefix, from the pack to the last upload
        packed = pack(source, folder, progress=progress, **pack_options)
        pushed = push(folder, url, workers=push_workers, progress=progress, claim=False)
    if staging is not None:
        return packed, pushed, folder
    shutil.rmtree(folder, ignore_errors=True)
    return packed, pushed, None
