"""main.TextFormatter, the server's default (text) log format, as a unit: one line per record, a
message's control characters escaped, at little cost to a line that has none."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
import warnings
from typing import Any

import pytest

from genserve_server import errors, main
from genserve_server.errors import escape_controls

FORMAT = "%(levelname)s %(name)s: %(message)s"


def _record(msg: str, *args: Any) -> logging.LogRecord:
    return logging.LogRecord("genserve_server.boundary", logging.DEBUG, __file__, 1, msg, args, None)


class _CountingEscapes(dict[int, str]):
    """errors.CONTROL_ESCAPES that counts str.translate's lookups (one per character translated)."""

    lookups = 0

    def __getitem__(self, key: int) -> str:
        type(self).lookups += 1
        return super().__getitem__(key)


def test_a_plain_log_line_is_not_escaped_character_by_character(monkeypatch: pytest.MonkeyPatch) -> None:
    """344da4c escaped every record's message with str.translate over a dict, one lookup a character:
    at --log-level DEBUG (a line per request and per batch) that doubled the formatting of a
    request's line (~5 -> ~10 us) for lines with nothing to escape, nearly all of them. A message with
    no control character (isprintable) is written as it is; one with any is escaped as before."""
    escapes = _CountingEscapes(errors.CONTROL_ESCAPES)
    monkeypatch.setattr(errors, "CONTROL_ESCAPES", escapes)
    formatter = main.TextFormatter(FORMAT)
    line = formatter.format(
        _record(
            "request request_id=%s method=%s model=%s version=%s code=%s duration_ms=%.3f",
            "4f1c2a9b",
            "/genserve.v1.GenerationService/Sample",
            "dcgan-digits",
            "1",
            "OK",
            3.214,
        )
    )
    assert line.endswith("model=dcgan-digits version=1 code=OK duration_ms=3.214")
    assert formatter.format(_record("model %s: café ünïcode", "naïve")).endswith("model naïve: café ünïcode")
    assert _CountingEscapes.lookups == 0

    forged = formatter.format(_record("skipping %s", "a\n2026-01-01 INFO forged\x1b[31m\xa0"))
    assert forged == "DEBUG genserve_server.boundary: skipping a\\n2026-01-01 INFO forged\\x1b[31m\xa0"
    assert _CountingEscapes.lookups > 0


FORGED = "2026-01-01 00:00:00,000 INFO genserve_server.repository: forged line request_id=forged"


def _logged(exc: BaseException) -> str:
    """What the text format writes for `exc` logged with its traceback (logger.exception)."""
    try:
        raise exc
    except BaseException as raised:
        record = _record("load failed")
        record.exc_info = (type(raised), raised, raised.__traceback__)
    return main.TextFormatter(FORMAT).format(record)


def _traceback_lines_stay(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines[0] == "DEBUG genserve_server.boundary: load failed", text
    assert lines[1].lstrip(" +|") in (
        "Traceback (most recent call last):",
        "Exception Group Traceback (most recent call last):",
    ), text
    assert not any(line.startswith(FORGED[:20]) for line in lines), text
    assert "\x1b" not in text and "\x00" not in text, text
    return lines


def test_an_exceptions_note_cannot_forge_a_line_in_its_traceback() -> None:
    """b02c1fc escaped each exception's message where it found it in the formatted traceback, but
    a note (add_note, which a library adds to say what it was doing, quoting a file's name) was
    written as it was: its newline wrote a line of its own, `key=value` fields and ESC included."""
    error = ValueError("cannot load the graph")
    error.add_note(f"while loading e\n{FORGED}\x1b[31m")
    lines = _traceback_lines_stay(_logged(error))
    assert lines[-2:] == ["ValueError: cannot load the graph", f"while loading e\\n{FORGED}\\x1b[31m"]


def test_an_exception_groups_members_cannot_forge_lines_in_its_traceback() -> None:
    """The members of an ExceptionGroup are neither the cause nor the context of the group, so
    b02c1fc left their messages and notes unescaped (and the traceback indents them, so the
    message was not found to be replaced anyway)."""
    member = RuntimeError(f"node e\n{FORGED}\x1b[31m")
    member.add_note(f"note e\n{FORGED}\x00")
    text = _logged(ExceptionGroup("loads failed", [member, KeyError("x")]))
    lines = _traceback_lines_stay(text)
    assert any(line.endswith(f"RuntimeError: node e\\n{FORGED}\\x1b[31m") for line in lines), text
    assert any(line.endswith(f"note e\\n{FORGED}\\x00") for line in lines), text


@pytest.mark.parametrize("message", ["\n", "\t", "a\nb"])
def test_an_exceptions_message_is_escaped_in_its_own_line_only(message: str) -> None:
    """A message whose text is found elsewhere in the traceback ("\\n" ends every one of its lines)
    was replaced there too: the whole traceback written on one line, `\\n` between its lines."""
    lines = _traceback_lines_stay(_logged(ValueError(message)))
    assert lines[-1] == f"ValueError: {escape_controls(message)}", lines
    assert any(line.startswith("  File ") for line in lines), lines


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_python_warning_is_logged_without_a_trailing_newline(
    capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    """setup_logging routes Python warnings to the log (logging.captureWarnings), whose text is
    warnings.formatwarning's, ending with a newline: the text line ended with a literal `\\n` (and
    the JSON msg with a newline). The warning's own text is kept, without the trailing newline."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            main.setup_logging("INFO", as_json)
            warnings.warn_explicit("x\n  y", UserWarning, "<string>", 3, module="genserve_test_warning")
            root.handlers[0].flush()
        finally:
            logging.captureWarnings(False)
            root.handlers[:] = saved_handlers
            root.setLevel(saved_level)
    written = capsys.readouterr().err.splitlines()
    assert len(written) == 1, written
    if as_json:
        assert json.loads(written[0])["msg"] == "<string>:3: UserWarning: x\n  y"
    else:
        assert written[0].endswith(" WARNING py.warnings: <string>:3: UserWarning: x\\n  y"), written


def test_text_log_timestamps_are_utc_and_say_so_whatever_the_hosts_time_zone(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The text log's time was the host's local time with no zone: on a host (or a container given
    TZ) east or west of UTC its lines could not be put beside the JSON log's `ts`, another host's
    lines or a metric's time, and across a daylight-saving fall-back its times went back an hour and
    repeated (01:30 then 01:00 for two lines half an hour apart). They are UTC, written with a `Z`."""
    monkeypatch.setenv("TZ", "EST5EDT,M3.2.0,M11.1.0")  # New York's rules, no tz database needed
    time.tzset()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        main.setup_logging("INFO", False)
        # 2026-11-01 05:30 and 06:00 UTC: 01:30 EDT, then 01:00 EST (the clocks fall back at 06:00)
        for created in (1_793_511_000.0, 1_793_512_800.25):
            record = logging.LogRecord("genserve_server.main", logging.INFO, __file__, 1, "line", (), None)
            record.created, record.msecs = created, (created % 1) * 1000
            root.handle(record)
        root.handlers[0].flush()
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        monkeypatch.delenv("TZ")
        time.tzset()
    written = capsys.readouterr().err.splitlines()
    assert written == [
        "2026-11-01T05:30:00.000Z INFO genserve_server.main: line",
        "2026-11-01T06:00:00.250Z INFO genserve_server.main: line",
    ], written


def test_a_path_the_locale_did_not_decode_is_logged_readably_under_a_c_locale() -> None:
    """Under a locale that is not UTF-8 (LANG=C without Python's UTF-8 mode) a non-ASCII path's bytes
    are lone surrogates: the log wrote /srv/modèles as 'mod\\udcc3\\udca8les' (stderr's
    backslashreplace of each surrogate), in a message and in an exception's, and --log-json as
    "mod\\udcc3\\udca8les", which a JSON reader reads as two lone surrogates. Such bytes are written
    as the UTF-8 they are ('mod\\xe8les' on an ASCII stderr, "mod\\u00e8les" in JSON, modèles once
    read); bytes that are not UTF-8 (a Latin-1 name) as \\xNN."""
    path = "/srv/mod\udcc3\udca8les/gen/v\udce9rsion"  # modèles (UTF-8), vérsion (Latin-1)
    record = _record("loading %s", path)
    try:
        raise FileNotFoundError(f"cannot read {path}")
    except OSError:
        record.exc_info = sys.exc_info()
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="backslashreplace")  # LANG=C's
    handler = logging.StreamHandler(stream)
    handler.setFormatter(main.TextFormatter(FORMAT))
    handler.emit(record)
    stream.flush()
    written = stream.buffer.getvalue().decode("ascii")  # type: ignore[attr-defined]
    assert "\\udc" not in written, written
    assert written.startswith("DEBUG genserve_server.boundary: loading /srv/mod\\xe8les/gen/v\\xe9rsion\n")
    assert "FileNotFoundError: cannot read /srv/mod\\xe8les/gen/v\\xe9rsion\n" in written, written
    csi = main.TextFormatter(FORMAT).format(_record("loading %s", "/srv/\udcc2\udc9b31m"))
    assert csi.endswith("loading /srv/\\x9b31m"), csi  # C1's CSI: a terminal escape, escaped
    entry = json.loads(main.JsonFormatter().format(record))
    assert entry["msg"] == "loading /srv/modèles/gen/v\\xe9rsion"
    assert "/srv/modèles/gen/v\\xe9rsion" in entry["exc"]
