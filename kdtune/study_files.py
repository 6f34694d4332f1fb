"""A study folder's kdtune_study.json: the MLflow study run and the command it came from, written once when
the study starts and read back to resume it (`--resume`, `kdtune study resume`)."""
from __future__ import annotations

import json

from kdtune.errors import ConfigError
from kdtune.storage import Location, check_storage

STUDY_FILE = "kdtune_study.json"


def write_study_file(study_dir: Location, content: dict) -> None:
    """Written once, when the study starts (a resumed study keeps the file it started with)."""
    path = study_dir / STUDY_FILE
    if not path.exists():
        path.write_text(json.dumps(content, indent=2))


def read_study_file(spec) -> dict:
    check_storage(spec.resume, option="resume")  # an unreachable bucket or endpoint: one line, not a hang
    path = Location.of(spec.resume) / STUDY_FILE
    try:
        saved = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError) as error:
        raise ConfigError(f"resume={spec.resume!r}: {STUDY_FILE} could not be read ({error})") from None
    if saved is None:
        raise ConfigError(f"resume={spec.resume!r}: not a kdtune study folder (no {STUDY_FILE}); "
                          "give the folder printed as 'study folder: ...' when the study started")
    if saved.get("name") != spec.name:
        raise ConfigError(f"resume={spec.resume!r}: that folder holds study {saved.get('name')!r}, not {spec.name!r}")
    return saved
