"""Token files an operator writes with ordinary tools (review of the security surface)."""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve_server.config import ConfigError, SecurityConfig
from genserve_server.security import auth_interceptor, load_tokens


def test_a_utf8_bom_is_not_part_of_the_first_token(tmp_path: Path) -> None:
    """PowerShell's `Set-Content -Encoding UTF8` (and other Windows editors) start the file with a
    BOM: it stayed glued to the first token, so the server started and refused every client
    presenting that token as UNAUTHENTICATED."""
    token_file = tmp_path / "tokens"
    token_file.write_bytes("\ufeffalpha\r\nbeta\r\n".encode())
    assert load_tokens(token_file) == (b"alpha", b"beta")


@pytest.mark.parametrize(
    ("content", "line"),
    [("alpha\nt\u00f6ken\n", 2), ("al\tpha\n", 1), ("alpha\nbeta\x00\n", 2)],
)
def test_a_token_no_client_can_send_stops_startup_naming_file_and_line(
    tmp_path: Path, content: str, line: int
) -> None:
    """gRPC metadata values are printable ASCII: a token with a non-ASCII or control character can
    never be presented, so the server 'had' a token nobody could use. Refused at start-up, naming
    the file and line, never the token."""
    token_file = tmp_path / "tokens"
    token_file.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{token_file}: line {line}") as info:
        auth_interceptor(SecurityConfig(token_file=token_file))
    assert "t\u00f6ken" not in str(info.value) and "pha" not in str(info.value)


def test_a_token_file_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    """A UTF-16 file (Windows PowerShell 5's `>` redirection) failed with "auth: 'utf-8' codec can't
    decode byte 0xff in position 0", naming neither the file nor the source."""
    token_file = tmp_path / "tokens"
    token_file.write_bytes("alpha\n".encode("utf-16"))
    with pytest.raises(ConfigError, match=f"{token_file}.*UTF-8"):
        auth_interceptor(SecurityConfig(token_file=token_file))


def test_a_token_in_the_environment_no_client_can_send_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSERVE_TEST_TOKENS", "alpha,b\u00e9ta")
    with pytest.raises(ConfigError, match="GENSERVE_TEST_TOKENS: token 2") as info:
        auth_interceptor(SecurityConfig(token_env="GENSERVE_TEST_TOKENS"))
    assert "b\u00e9ta" not in str(info.value)
