"""kdtune runs inside users' scripts: what it changes process-wide for a study, it gives back afterwards."""
from __future__ import annotations

import logging
import os

import mlflow

from kdtune.scoped import logger_level
from kdtune.tracking import tracking_at


def test_a_study_points_mlflow_at_its_server_only_while_it_runs(tmp_path, monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(key, raising=False)
    mine, study = f"sqlite:///{tmp_path / 'mine.db'}", f"sqlite:///{tmp_path / 'study.db'}"
    mlflow.set_tracking_uri(None)
    try:
        with tracking_at(study):
            assert mlflow.get_tracking_uri() == study and mlflow.get_registry_uri() == study
        assert not mlflow.is_tracking_uri_set()  # unset, as it was
        assert "MLFLOW_REGISTRY_URI" not in os.environ and "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ
        mlflow.set_tracking_uri(mine)
        mlflow.set_registry_uri(mine)
        try:
            with tracking_at(study):
                raise RuntimeError("a study that fails")
        except RuntimeError:
            pass
        assert mlflow.get_tracking_uri() == mine and mlflow.get_registry_uri() == mine
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


def test_a_library_is_quieted_for_one_block_only():
    logger = logging.getLogger("optuna")
    before = logger.level
    with logger_level("optuna", logging.ERROR):
        assert logger.level == logging.ERROR
    assert logger.level == before
