"""Claims of the docs and --help texts checked against the client's behaviour."""

from __future__ import annotations

import argparse

import pytest

from genserve_client import cli


def _subcommand(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("command", ["sample", "interpolate", "arithmetic", "bulk", "mix"])
def test_psi_help_names_the_real_default(command: str) -> None:
    """`--psi` without a value sends no truncation_psi, and the server then truncates nothing: no
    model, card or config.json has a psi of its own. The help said "(default: the model's)", which
    sends a user looking for a per-model truncation that does not exist."""
    parser = _subcommand(command)
    psi = next(a for a in parser._actions if "--psi" in a.option_strings)
    assert psi.default is None
    assert "the model's" not in (psi.help or "")
    assert "default: none" in (psi.help or "")
