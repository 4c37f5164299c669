"""Where the real ALL images are (Aria et al. 2021): ``$ALLCLUSTER_ALL_DATA`` or ``../shared/...``
beside the repository. Benchmarks and tests read them from here."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_ALL_DATA = REPO.parent / "shared" / "data" / "all_aria_2021" / "Original"


def all_data_dir() -> Path:
    """The real ALL images (Aria et al. 2021): ``$ALLCLUSTER_ALL_DATA`` or ``../shared/...``, resolved
    (indexing and scoring resolve a linked folder: paths built from this one then match theirs)."""
    return Path(os.environ.get("ALLCLUSTER_ALL_DATA", DEFAULT_ALL_DATA)).resolve()
