"""What genserve's CLIs (genserve-client, genserve-export, genserve-server and its health probe) do
with a stdout that cannot take their output: its reader gone (`| head -1`, `| true`: a write raises
BrokenPipeError) or closed from the start (`>&-`: Python then has no sys.stdout), a stderr closed
(`2>&-`: no sys.stderr), and --help's text to such a stdout. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, ClassVar, TextIO

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

# 128 + SIGPIPE, what a shell reports for a filter killed by the pipe.
READER_GONE_STATUS = 141


def err_line(text: str) -> None:
    """One line to stderr; nothing where the process started with stderr closed (`2>&-`)."""
    if sys.stderr is None:
        return
    line = text + "\n"
    if getattr(sys.stderr, "buffer", None) is not None and any("\udc80" <= c <= "\udcff" for c in line):
        # A path's bytes the locale did not decode (lone surrogates: any non-ASCII byte under LANG=C)
        # went out through stderr's backslashreplace as \udcc3, naming a folder that does not exist
        # (a resume hint pasted as is): they are written as they came.
        _write_raw(sys.stderr, line)
        return
    sys.stderr.write(line)


def _write_raw(stream: TextIO, text: str) -> None:
    """`text` to `stream` as its bytes: a file name's undecodable bytes (lone surrogates) as they
    came, each character the stream's encoding cannot hold (ASCII under a locale that is not UTF-8)
    as a repr writes it (\\xf6, \\u2014), as Python's stderr does."""
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        stream.write(text.encode("ascii", "backslashreplace").decode("ascii"))
        return
    encoding = stream.encoding or "utf-8"
    stream.flush()
    buffer.write(b"".join(_raw(c, encoding) for c in text))
    buffer.flush()


def _raw(c: str, encoding: str) -> bytes:
    """One character in `encoding`: an undecodable byte (a lone surrogate) as it came, a character
    the encoding cannot hold as a repr writes it (\\xf6, \\u2014)."""
    try:
        return c.encode(encoding, "surrogateescape")
    except UnicodeEncodeError:
        return c.encode("ascii", "backslashreplace")


class Stdout:
    """A CLI's stdout and what became of it: its reader gone (the rest of the output goes nowhere)
    or closed from the start. The command finishes its work either way; exit_status then answers."""

    def __init__(self) -> None:
        self.reader_gone = False
        self.closed = False

    def say(self, text: str, *, flush: bool = False) -> None:
        """One line to stdout."""
        if sys.stdout is None:
            self.closed = True
            return
        try:
            try:
                sys.stdout.write(text + "\n")
            except UnicodeEncodeError:  # nothing was written: the text is encoded before it is buffered
                _write_raw(sys.stdout, text + "\n")
            if flush:
                sys.stdout.flush()
        except BrokenPipeError:
            self.lose()

    def lose(self) -> None:
        """The reader went away: say nothing more. stdout is pointed at devnull so that what is still
        buffered, and the interpreter's final flush, cannot fail."""
        self.reader_gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)  # stdout holds its own copy

    def exit_status(self, status: int, closed_line: str) -> int:
        """The exit status once the command is done, its own being `status`: where it succeeded, 141
        without a word for a reader gone, and `closed_line` on stderr and 1 for a stdout closed from
        the start, as coreutils do (`ls >&-`)."""
        if sys.stdout is not None:
            try:
                sys.stdout.flush()  # a pipe's buffered lines: a reader gone is found here, not at exit
            except BrokenPipeError:
                self.lose()
        if self.closed and status == 0:
            err_line(closed_line)
            return 1
        return READER_GONE_STATUS if self.reader_gone and status == 0 else status


class HelpParser(argparse.ArgumentParser):
    """--help's text to a stdout whose reader went away exits 141 without a word, where argparse's
    own write left the error to the interpreter's final flush ("Exception ignored ...
    BrokenPipeError", exit 120) or, unbuffered, dropped it (exit 0). A subclass names the CLI's
    Stdout in `stdout` (subparsers are of the parser's class): a closed stdout is noted there, for
    its exit_status once parse_args has exited 0. Without one (genserve-server's parsers, whose
    exit status is their answer), a closed stdout is left to argparse."""

    stdout: ClassVar[Stdout | None] = None

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        if file is not None or (sys.stdout is None and self.stdout is None):
            super().print_help(file)
            return
        stdout = self.stdout or Stdout()
        stdout.say(self.format_help().removesuffix("\n"), flush=True)
        if stdout.reader_gone:
            self.exit(READER_GONE_STATUS)

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        # --version's line (argparse writes it here, to sys.stdout) goes the way --help's text does;
        # usage errors go to stderr, as argparse's.
        if file is not sys.stdout or (sys.stdout is None and self.stdout is None):
            super()._print_message(message, file)
            return
        stdout = self.stdout or Stdout()
        stdout.say(message.removesuffix("\n"), flush=True)
        if stdout.reader_gone:
            self.exit(READER_GONE_STATUS)
