"""The node's logs: text or JSON lines ([log] format), one setup for the daemon and its worker,
control characters escaped in both, and the traceback that a failed series' reason promises
written at debug level (`-v`)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from dicom_node.app.config import ConfigError, LogConfig, load_config
from dicom_node.logs import LogFormat, formatter, setup_logging
from dicom_node.testbed.node_process import NodeProcess
from tests.support import PhantomSeries


def _record(message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc else None
    return logging.LogRecord("dicom_node.x", logging.ERROR, __file__, 1, message, args, exc_info)


def test_json_lines_escape_control_characters_as_text_does() -> None:
    try:
        raise ValueError("bad\nheader")
    except ValueError as error:
        record = _record("series %s:\x1b[31m forged\nline\u2028", "1.2\r3", exc=error)
    line = formatter(LogFormat.JSON).format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "series 1.2\\r3:\\x1b[31m forged\\nline\\u2028"
    assert (entry["level"], entry["logger"], entry["process"]) == ("ERROR", "dicom_node.x", "node")
    assert entry["exc_info"].startswith("Traceback") and "ValueError: bad" in entry["exc_info"]
    assert entry["time"]
    text = formatter(LogFormat.TEXT, process="worker").format(_record("a\nb"))
    assert text.endswith(" ERROR worker dicom_node.x: a\\nb")


@pytest.mark.parametrize("log_format", list(LogFormat))
def test_library_messages_quoting_header_values_are_redacted(
    log_format: LogFormat, capfd: pytest.CaptureFixture[str]
) -> None:
    """pydicom quotes the value it finds invalid (a birth date), highdicom a patient name it
    doubts (through Python's warnings): in the node's log the messages stay, the values go."""
    import warnings

    from highdicom.valuerep import check_person_name
    from pydicom.dataset import Dataset

    # pytest restores `warnings.showwarning` after each test, under the feet of an earlier
    # test's capture: reset logging's record of it, so that setup_logging captures anew.
    logging.captureWarnings(False)
    setup_logging(log_format)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            Dataset().PatientBirthDate = "17.04.1923"  # pydicom: Invalid value for VR DA
            check_person_name("SOLOPATIENT")  # highdicom: unlikely to be a person name
    finally:
        logging.captureWarnings(False)
        setup_logging(None)  # the node's handler off again: records held, none written
    err = capfd.readouterr().err
    assert "Invalid value for VR DA" in err and "person name" in err, err
    assert "17.04.1923" not in err and "SOLOPATIENT" not in err, err


def test_log_format_is_checked(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[log]\nformat = "json"\n')
    assert load_config(config).log == LogConfig(LogFormat.JSON)
    config.write_text('[log]\nformat = "xml"\n')
    with pytest.raises(ConfigError, match=r"log\.format: expected 'text' or 'json', got 'xml'"):
        load_config(config)


def test_daemon_and_worker_write_json_lines_without_identifiers(
    tmp_path: Path, phantom_series: PhantomSeries
) -> None:
    """A real daemon with `format = "json"` and `-v`: reception, the stages and the worker
    write JSON lines; a series whose SEG cannot be written fails with an internal error, and
    the traceback its reason promises is in the worker's line; no patient name or ID."""
    ct = phantom_series(1003)["ct"]  # PHANTOM^SEED1003, ID PH1003
    node = NodeProcess(tmp_path / "node", extra_config='[log]\nformat = "json"\n', verbose=True)
    node.start()
    try:
        results = node.data_dir / "results"
        shutil.rmtree(results)
        results.write_text("a file where the SEG folder was")  # the SEG write fails
        uid = node.send_series(ct)
        node.wait_for_states({uid}, {"failed", "done", "no_findings"}, timeout=240)
        status = node.series()[uid]
    finally:
        node.stop()
    assert status["state"] == "failed", status
    assert "internal error: NotADirectoryError (details: node log at debug level)" in str(
        status["reason"]
    )
    entries = [json.loads(line) for line in node.log.read_text().splitlines()]
    loggers = {(e["process"], e["logger"]) for e in entries}
    assert ("node", "dicom_node.net.receive") in loggers, sorted(loggers)
    assert ("worker", "dicom_node.pipeline.worker") in loggers, sorted(loggers)
    traceback = [e for e in entries if e["process"] == "worker" and "exc_info" in e]
    assert traceback and "NotADirectoryError" in traceback[0]["exc_info"], traceback
    text = node.log.read_text()
    for identifier in ("PHANTOM", "SEED1003", "PH1003"):
        assert identifier not in text
