"""Paths built from data (split-list ids, input file names) must stay inside the folder they name.

One check for every such path, read or written: a sample id ``../../etc/passwd`` in a VOC split list,
or an output name that would climb out of ``--out``, is a user error instead of a silent read or write
elsewhere. The check is lexical (``..`` and absolute paths); symbolic links inside a root are the
user's own layout choice and are followed.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from trustseg.errors import UserError


def inside(root: Path | str, relative: str | PurePath, what: str) -> Path:
    """``root / relative``, refusing a `relative` that is absolute, empty or climbs out with ``..``.

    `what` names the source of `relative` in the error, e.g. ``"VOC split list train.txt: sample id"``.
    """
    text = str(relative)
    normal = os.path.normpath(text) if text else ""
    if (not text or "\0" in text or PurePath(text).is_absolute() or PurePath(text).drive
            or normal == ".." or normal.startswith(".." + os.sep) or normal == "."):
        raise UserError(f"{what} {text!r} leads outside {root}; expected a relative path inside it")
    return Path(root) / normal
