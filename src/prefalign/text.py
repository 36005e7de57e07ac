"""Text from outside (a server's reply, a model's output, a file name) made safe to print.

A terminal acts on control characters: ESC starts sequences that move the cursor, clear the
screen, set the window title or recolour what follows, BEL rings, CR overwrites a line. Such
text is printed through `printable`, which writes each control character as a visible
escape instead.
"""

import re

# C0 controls, DEL and C1 controls (U+0080-U+009F: U+009B alone starts a sequence on some
# terminals, as ESC [ does).
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str, keep: str = "\n\t", replace: str | None = None) -> str:
    """`text` with every control character but those in `keep` escaped: ESC -> "\\x1b",
    BEL -> "\\x07", U+009B -> "\\x9b" (or each replaced by `replace`, e.g. "?").

    printable("a\\x1b[2Jb") -> "a\\\\x1b[2Jb". ESC is escaped even when `keep` names it.
    """
    def escape(match: re.Match) -> str:
        char = match.group(0)
        if char in keep and char != "\x1b":
            return char
        return replace if replace is not None else f"\\x{ord(char):02x}"

    return CONTROL.sub(escape, text)


def warn(message: str) -> None:
    """One `warning:` line on stderr that a progress bar on the same terminal does not tear."""
    import sys

    from tqdm.auto import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)
