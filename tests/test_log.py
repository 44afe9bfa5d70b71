"""stf_pipeline.log.setup: one handler however often it is called, INFO bare, other levels prefixed."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from stf_pipeline.log import LOGGER_NAME, setup


@pytest.fixture
def logger():
    """The package logger, its handlers, level and propagation restored after the test."""
    log = logging.getLogger(LOGGER_NAME)
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    yield log
    log.handlers[:] = handlers
    log.setLevel(level)
    log.propagate = propagate


def test_setup_replaces_its_own_handler_and_keeps_others(logger, capsys):
    before = list(logger.handlers)  # may hold an earlier setup's handler and pytest's capture handlers
    other = logging.NullHandler()
    logger.addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    setup("INFO", stream=first)
    setup("info", stream=second)
    logger.getChild("methods").info("fused %d dates", 3)
    assert first.getvalue() == "" and second.getvalue() == "fused 3 dates\n"

    handler = setup(logging.DEBUG)  # writes to the current sys.stderr (pytest's capture here)
    assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
    logger.debug("tile %s", "a")
    assert capsys.readouterr().err == "debug: tile a\n"
    assert second.getvalue() == "fused 3 dates\n"
    assert [h for h in logger.handlers if h not in before] == [other, handler]
