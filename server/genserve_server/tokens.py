"""Reading the bearer tokens of a token file or variable, shared by the server and its health
probe (which sends the first): stdlib only, so the probe stays a Python start and one RPC."""

from __future__ import annotations

import os
import re
from pathlib import Path

# What a token file's line may have around its token: spaces, tabs, and CRLF's \r.
TOKEN_LINE_BLANKS = " \t\r"
# A shell variable's name (POSIX "Name"): only such a name is quoted when no token is under it.
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _unsendable(token: str) -> str | None:
    """What keeps a client from presenting `token` (gRPC metadata values are printable ASCII), or
    None; never quotes the token."""
    for char in token:
        if not " " <= char <= "~":
            kind = "a non-ASCII" if char > "~" else "a control"
            return f"holds {kind} character, which no gRPC client can send in a header"
    return None


def load_tokens(token_file: Path | None = None, env_var: str | None = None) -> tuple[bytes, ...]:
    """Tokens from a file (one per line, `#` comments) and/or an environment variable (comma-separated).

    Raises ValueError when a source is named but yields no token, so a typo never silently turns
    authentication off, and when a token could never be presented (a character gRPC metadata
    cannot carry), naming the file and line or the variable and position, never the token (nor a
    variable's "name" that is no shell variable name and has no token under it: a token given in
    its place). A UTF-8
    BOM at the start of the file is not part of the first token; lines end at \n or \r\n only.
    """
    tokens: list[str] = []
    if token_file is not None:
        try:
            text = token_file.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ValueError(f"{token_file}: not UTF-8 text (one token per line)") from None
        from_file = []
        # Lines end at \n (CRLF's \r stripped) alone: str.splitlines also breaks at a form feed, a
        # vertical tab, \x1c-\x1e, NEL and U+2028, which split a token holding one into two shorter
        # tokens that each authenticated; and str.strip dropped control and non-ASCII characters at
        # a token's ends. Both are characters no client can send: refused below, naming the line.
        for number, raw in enumerate(text.split("\n"), 1):
            line = raw.strip(TOKEN_LINE_BLANKS)
            if not line or line.startswith("#"):
                continue
            problem = _unsendable(line)
            if problem is not None:
                raise ValueError(f"{token_file}: line {number}: the token {problem}")
            from_file.append(line)
        if not from_file:
            raise ValueError(f"{token_file}: no token in the file")
        tokens.extend(from_file)
    if env_var is not None:
        from_env = [t.strip() for t in os.environ.get(env_var, "").split(",") if t.strip()]
        if not from_env:
            if _VARIABLE_NAME.fullmatch(env_var) is None:
                # Most likely the token itself given for its variable's name: never into a log.
                raise ValueError(
                    "--token-env (auth.token_env) takes an environment variable's name, not a token: "
                    "the value given is no variable name, and no token is under it (value not shown)"
                )
            raise ValueError(f"environment variable {env_var} holds no token")
        for position, token in enumerate(from_env, 1):
            problem = _unsendable(token)
            if problem is not None:
                raise ValueError(f"environment variable {env_var}: token {position} {problem}")
        tokens.extend(from_env)
    return tuple(t.encode() for t in tokens)
