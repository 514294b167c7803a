"""Where a deployment file lets a secret onto a command line, which ``ps`` and ``/proc/*/cmdline`` show.

A secret may reach a process through its environment (``NAME="$SECRET" cmd``) or its standard input
(a here-document); not as an argument, neither expanded by Kubernetes (``$(SECRET)``) nor by a shell
(``cmd -a "$SECRET"``, ``--requirepass $SECRET``).
"""

from __future__ import annotations

import re

HERE_DOCUMENT = re.compile(r"<<-?\s*'?(\w+)'?\n.*?\n\s*\1\s*(?:\n|$)", re.S)
ENV_ASSIGNMENT = re.compile(r"(?:^|[\s;&|(])\w+=(\"[^\"]*\"|'[^']*'|\S*)")
PASSWORD_FLAGS = re.compile(r"(?:^|\s)(?:-a|--requirepass|--masterauth|--pass|--password)(?:\s|=|$)")


def leaks(words: list[str], secrets: set[str]) -> list[str]:
    """The parts of a command (``command`` + ``args``, or a probe's) that put a secret on a command line."""
    found = []
    for word in words:
        if any(f"$({name})" in word for name in secrets):  # Kubernetes substitutes these into argv itself
            found.append(word)
            continue
        shell = ENV_ASSIGNMENT.sub(" ", HERE_DOCUMENT.sub("\n", word))
        if any(re.search(rf"\$\{{?{name}\b", shell) for name in secrets) or PASSWORD_FLAGS.search(shell):
            found.append(word)
    return found
