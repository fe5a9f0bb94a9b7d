"""The CLI's token flags, in-process against the fake server."""

from __future__ import annotations

from pathlib import Path

import pytest
from client_fakes import FakeServer, cli_main

from genserve_client import ChannelConfig, TlsOptions

TOKEN = "tok-A_1"
OTHER = "tok-B_2"


def test_token_file_in_the_servers_format_sends_its_one_token(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token file written as the server's (docs/operations.md: one per line, `#` comments; CRLF
    from an editor) sent the whole text, comments and line breaks included, as the header value:
    the call failed `INTERNAL: Invalid metadata`, naming neither the file nor the token."""
    tokens = tmp_path / "token"
    tokens.write_bytes(f"# the bulk job's token\r\n\r\n{TOKEN}\r\n".encode())
    code, _, err = cli_main(capsys, "--target", fake_server.target, "--token-file", str(tokens), "models")
    assert code == 0, err
    assert fake_server.service.metadata[-1]["authorization"] == f"Bearer {TOKEN}"
    # --token-file wins over --token (e.g. one from the environment): the unused one is not checked.
    args = ("--target", fake_server.target, "--token", "tök", "--token-file", str(tokens), "models")
    code, _, err = cli_main(capsys, *args)
    assert code == 0, err
    assert fake_server.service.metadata[-1]["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(
    ("order", "sent"),
    [
        (("--token-file", "{file}", "models", "--token", OTHER), OTHER),
        (("--token-file", "{file}", "--token", OTHER, "models"), OTHER),
        (("models", "--token-file", "{file}", "--token", OTHER), OTHER),
        (("--token", OTHER, "models", "--token-file", "{file}"), TOKEN),
        (("models", "--token", OTHER, "--token-file", "{file}"), TOKEN),
    ],
)
def test_the_token_flag_given_last_wins_whether_token_or_token_file(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    order: tuple[str, ...],
    sent: str,
) -> None:
    """--token-file always won over --token, even a --token given after the command, where
    docs/client.md says a flag given after the command wins: `genserve-client --token-file F models
    --token T` sent F's token. Both are one setting, the bearer token, and the one given last wins
    (as the server's token flags replace the config file's token sources)."""
    tokens = tmp_path / "token"
    tokens.write_text(f"{TOKEN}\n")
    args = [a.format(file=tokens) for a in order]
    code, _, err = cli_main(capsys, "--target", fake_server.target, *args)
    assert code == 0, err
    assert fake_server.service.metadata[-1]["authorization"] == f"Bearer {sent}"


def test_token_file_with_several_tokens_is_refused_naming_the_file(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/deploy.md's tokens.txt (two tokens, the server's list) given to --token-file: exit 2 with
    a message naming the file, before any call, and never the tokens themselves."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKEN}\n{OTHER}\n")
    code, _, err = cli_main(capsys, "--target", fake_server.target, "--token-file", str(tokens), "models")
    assert code == 2, err
    assert str(tokens) in err and "2 tokens" in err and "Traceback" not in err
    assert TOKEN not in err and OTHER not in err
    assert not fake_server.service.calls
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    code, _, err = cli_main(capsys, "--target", fake_server.target, "--token-file", str(empty), "models")
    assert code == 2 and str(empty) in err and "no token" in err, err


@pytest.mark.parametrize("bad", ["tok\nen", "tök", "tok\ten"])
def test_a_token_no_header_can_carry_is_refused_without_echoing_it(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    """`--token` (or ChannelConfig.token) with a character gRPC metadata cannot carry failed every call
    with `INTERNAL: Invalid metadata`; it is refused up front, naming the field and not the value."""
    code, _, err = cli_main(capsys, "--target", fake_server.target, "--token", bad, "models")
    assert code == 2, err
    assert "token" in err and bad not in err and "Invalid metadata" not in err
    assert not fake_server.service.calls
    with pytest.raises(ValueError, match="ChannelConfig.token") as info:
        ChannelConfig(fake_server.target, token=bad)
    assert bad not in str(info.value)


@pytest.mark.parametrize("char", ["\x0c", "\x1c", "\u2028"])
def test_a_token_file_whose_one_token_holds_a_form_feed_or_such_names_the_character_not_two_tokens(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], char: str
) -> None:
    """read_token_file split the file with str.splitlines, which also breaks at a form feed, \\x1c-\\x1e,
    NEL and U+2028: a file of one token holding one was refused as 'holds 2 tokens (... a server's
    list)', sending the user after a second line the file does not have. Lines end at \\n, as in the
    server's load_tokens, and the character is named."""
    token_file = tmp_path / "token"
    token_file.write_text(f"# mine\ntok{char}en\n", encoding="utf-8")
    code, _, err = cli_main(capsys, "--target", fake_server.target, "--token-file", str(token_file), "models")
    assert code == 2, err
    assert str(token_file) in err and "2 tokens" not in err and "character" in err, err
    assert "tok" not in err.replace("token", "") and not fake_server.service.calls


@pytest.mark.parametrize(
    "flags",
    [
        ("--token-file", "{missing}"),
        ("--tls-ca", "{missing}"),
        ("--tls-cert", "{missing}", "--tls-key", "{missing}"),
        ("--token-file", "{folder}"),
    ],
)
def test_a_connection_file_that_cannot_be_read_is_a_bad_argument_naming_its_flag(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: tuple[str, ...]
) -> None:
    """A --token-file or --tls-* naming a file that is not there (or a folder) failed with exit 1,
    '[Errno 2] No such file or directory: ...', naming no flag, where a file that holds no token or
    no PEM is refused with exit 2 naming its flag: it is a bad argument too, named before any call."""
    given = [f.format(missing=tmp_path / "nofile", folder=tmp_path) for f in flags]
    code, _, err = cli_main(capsys, "--target", fake_server.target, *given, "models")
    assert code == 2, err
    assert f"{given[0]} {given[1]}: cannot read it" in err, err
    assert not fake_server.service.calls


def test_a_channel_configs_repr_shows_that_a_token_and_a_client_key_are_set_not_their_values() -> None:
    """ChannelConfig and TlsOptions are dataclasses: their default repr held the token and the
    client's private key, so `log.info("config %s", cfg)` or an error that embeds the config wrote
    both into a log."""
    key = b"-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES\n-----END PRIVATE KEY-----\n"
    tls = TlsOptions(root_certs=b"ca", client_cert=b"cert", client_key=key)
    config = ChannelConfig(target="127.0.0.1:1", tls=tls, token=TOKEN)
    for text in (repr(config), str(config), repr(tls), f"{config!s}"):
        assert TOKEN not in text
        assert "SECRETKEYBYTES" not in text
        assert "PRIVATE KEY" not in text
    assert "target='127.0.0.1:1'" in repr(config)
    assert "token=<set>" in repr(config)
    assert "client_key=<set>" in repr(tls)
    assert "token=None" in repr(ChannelConfig(target="127.0.0.1:1"))
    assert "client_key=None" in repr(TlsOptions())
